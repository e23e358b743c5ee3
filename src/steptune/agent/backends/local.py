"""In-process transformers backend: a batch of conversations becomes one batched `generate` call."""

from __future__ import annotations

from pathlib import Path

from steptune.agent.backends.base import ChatBackend, Conversation, GenerationConfig


def cut_at_stop(text: str, stop: list[str]) -> str:
    """Cut `text` at the earliest stop string (the stop string itself is dropped)."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]


_PER_ROW_PREFILL_MODELS = {"llama", "qwen2", "qwen3", "mistral", "smollm3"}


class _StopOnStrings:
    """Per-row stop on strings in the *generated* text only. (transformers' `stop_strings` also matches
    across the prompt boundary, so a stop like "\\nThought:" fires on a reply that starts "Thought:".)"""

    def __init__(self, tokenizer, stop: list[str], prompt_len: int):
        self.tokenizer, self.stop, self.prompt_len = tokenizer, stop, prompt_len

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_len :], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stop) for t in texts], device=input_ids.device)


class LocalBackend(ChatBackend):
    """Left padding so every row's next token sits at the same position; KV cache on; fp32 on CPU
    (bf16 matmuls are ~90x slower there, see FACTS)."""

    def __init__(self, model_path: str | Path, device: str | None = None, dtype: str = "auto",
                 max_batch_size: int = 32, adapter: str | Path | None = None,
                 prefill_per_row: bool | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dtype == "auto":
            torch_dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        else:
            torch_dtype = getattr(torch, dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_path))
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch_dtype, use_safetensors=True)
        if adapter is not None:
            from peft import PeftModel

            self.model = PeftModel.from_pretrained(self.model, str(adapter)).merge_and_unload()
        self.model.to(self.device).eval()
        self.max_batch_size = max_batch_size
        self.context_window = getattr(self.model.config, "max_position_embeddings", None)
        self.tokens_generated = 0
        # On CPU a padded batch prefill costs more than the rows' prefills one by one (mask building and
        # masked attention dominate), so prompts are prefilled row by row, unpadded, and their KV caches
        # left-padded into one batch that then decodes together. Only for plain-attention models.
        if prefill_per_row is None:
            prefill_per_row = self.device == "cpu" and self.model.config.model_type in _PER_ROW_PREFILL_MODELS
        self.prefill_per_row = prefill_per_row

    def render(self, conversation: Conversation) -> str:
        return self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)

    def count_tokens(self, conversation: Conversation) -> int:
        return len(self.tokenizer(self.render(conversation), add_special_tokens=False)["input_ids"])

    def complete(self, conversations: list[Conversation], gen: GenerationConfig) -> list[str]:
        out: list[str] = []
        for i in range(0, len(conversations), self.max_batch_size):
            out.extend(self._generate(conversations[i : i + self.max_batch_size], gen))
        return out

    def _generate(self, conversations: list[Conversation], gen: GenerationConfig) -> list[str]:
        import torch

        prompts = [self.render(c) for c in conversations]
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        sampling = gen.temperature > 0
        kwargs = {"max_new_tokens": gen.max_new_tokens, "do_sample": sampling, "use_cache": True,
                  "pad_token_id": self.tokenizer.pad_token_id, "eos_token_id": self.tokenizer.eos_token_id}
        if sampling:
            kwargs.update(temperature=gen.temperature, top_p=gen.top_p)
            if gen.seed is not None:
                torch.manual_seed(gen.seed)
        else:  # silence "temperature is set but do_sample=False" from models whose generation config samples
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if gen.stop:  # finished rows stop early; the batch ends when every row has hit a stop or eos
            kwargs["stopping_criteria"] = [_StopOnStrings(self.tokenizer, gen.stop, enc["input_ids"].shape[1])]
        with torch.inference_mode():
            if self.prefill_per_row and len(prompts) > 1:
                enc["past_key_values"] = self._prefill_rows(enc["input_ids"], enc["attention_mask"])
            ids = self.model.generate(**enc, **kwargs)
        new = ids[:, enc["input_ids"].shape[1] :]
        self.tokens_generated += int((new != self.tokenizer.pad_token_id).sum())
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return [cut_at_stop(t, gen.stop) for t in texts]

    def _prefill_rows(self, input_ids, attention_mask):
        """A DynamicCache for all but the last prompt token of each (left-padded) row, computed unpadded.

        Left-padded cache slots are masked by `attention_mask` during decoding, and the cached keys carry
        the same rotary positions (0..n-1 per row) that generate derives from the mask, so the result
        equals padded batched prefill (checked by tests/test_backends.py)."""
        import torch
        from transformers import DynamicCache

        width = input_ids.shape[1] - 1
        per_row = []
        for ids, mask in zip(input_ids, attention_mask):
            real = ids[mask.bool()][None, :-1]
            per_row.append(self.model(input_ids=real, use_cache=True).past_key_values)
        cache = DynamicCache()
        for layer in range(len(per_row[0].layers)):
            keys, values = [], []
            for rc in per_row:
                k, v = rc.layers[layer].keys, rc.layers[layer].values
                pad = width - k.shape[2]
                keys.append(torch.nn.functional.pad(k, (0, 0, pad, 0)))
                values.append(torch.nn.functional.pad(v, (0, 0, pad, 0)))
            cache.update(torch.cat(keys), torch.cat(values), layer)
        return cache
