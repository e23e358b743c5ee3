"""vLLM offline engine (GPU only; `pip install steptune[vllm]`). Imported only when asked for."""

from __future__ import annotations

from steptune.backends.base import ChatBackend, Conversation, GenerationConfig


class VLLMBackend(ChatBackend):
    def __init__(self, model_path: str, tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.85,
                 max_model_len: int | None = None, dtype: str = "auto"):
        from vllm import LLM

        self.llm = LLM(model=model_path, tensor_parallel_size=tensor_parallel_size, dtype=dtype,
                       gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len)

    def complete(self, conversations: list[Conversation], gen: GenerationConfig) -> list[str]:
        from vllm import SamplingParams

        seeds = gen.row_seeds or [gen.seed] * len(conversations)
        params = [SamplingParams(max_tokens=gen.max_new_tokens, temperature=gen.temperature, top_p=gen.top_p,
                                 stop=gen.stop or None, seed=seed) for seed in seeds]
        # LLM.chat takes a list of conversations, applies the chat template and batches them itself.
        outputs = self.llm.chat(conversations, params, use_tqdm=False)
        return [o.outputs[0].text for o in outputs]
