"""Train a tiny chat model for a few seconds on golden ReAct games of TextWorldExpress coin, so that
tests exercise a policy that emits real (mostly valid) actions rather than random-init noise."""

from __future__ import annotations

from pathlib import Path


def golden_conversations(n_games: int = 12) -> list[list[dict[str, str]]]:
    from _twx_pool import twx_pool

    pool = twx_pool(1)
    convs = []
    try:
        for task in pool.tasks("train")[:n_games]:
            reset = pool.reset(0, task)
            conv = [{"role": "user", "content": f"{pool.instruction()}\n\n{reset.task}"}]
            while plan := pool.expert_actions(0):  # the expert re-plans from the current state
                action = plan[0]
                conv.append({"role": "assistant", "content": f"Thought: I should {action}.\nAction: {action}"})
                (res,) = pool.step_many([(0, action)])
                conv.append({"role": "user", "content": f"Observation: {res.observation}"})
                if res.done:
                    break
            convs.append(conv[:-1])
    finally:
        pool.close()
    return convs


def train_react_model(out_dir: Path, steps: int = 60) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from steptune.models.tiny import TinyModelConfig, build_tiny_model

    convs = golden_conversations()
    texts = [m["content"] for c in convs for m in c]
    cfg = TinyModelConfig(vocab_size=600, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    build_tiny_model(texts * 5, out_dir, cfg)
    tok = AutoTokenizer.from_pretrained(out_dir)
    model = AutoModelForCausalLM.from_pretrained(out_dir)
    rows = [tok.apply_chat_template(c, tokenize=False) for c in convs]
    enc = tok(rows, return_tensors="pt", padding=True, add_special_tokens=False)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    torch.manual_seed(0)
    for _ in range(steps):
        loss = model(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out_dir)
    return out_dir


def react_model_fixture(tmp_path_factory) -> Path:
    return train_react_model(tmp_path_factory.mktemp("react-model"), steps=60)


def varied_prompts() -> list[list[dict[str, str]]]:
    """First turns of golden games, with and without an earlier wrong step, so that lengths differ and a
    batch is really left-padded; the trained policy answers the first turns with `take coin`."""
    convs = golden_conversations(2)
    detour = [{"role": "assistant", "content": "Thought: Let me look.\nAction: look around"},
              {"role": "user", "content": "Observation: You see a coin."}]
    return [convs[0][:1], convs[0][:1] + detour, convs[1][:1], convs[1][:1] + detour * 2]
