"""Local transformers backend and the backend factory."""

import pytest
from _react_model import react_model_fixture, varied_prompts

from steptune.backends import BackendConfig, make_backend, parse_backend_spec
from steptune.backends.base import GenerationConfig
from steptune.backends.local import LocalBackend, cut_at_stop
from steptune.data.react import REACT_STOP, parse_react


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    return LocalBackend(react_model_fixture(tmp_path_factory))


@pytest.fixture(scope="module")
def prompts():
    return varied_prompts()


def test_batched_generation_equals_one_at_a_time(backend, prompts):
    gen = GenerationConfig(max_new_tokens=30)
    assert len({backend.count_tokens(c) for c in prompts}) > 1
    assert backend.complete(prompts, gen) == [backend.complete([c], gen)[0] for c in prompts]


def test_react_stops_end_turn_at_action_line(backend, prompts):
    out = backend.complete(prompts, GenerationConfig(max_new_tokens=60, stop=REACT_STOP))
    assert [parse_react(o).action for o in out[::2]] == ["take coin", "take coin"]  # first turns
    assert all(o.rstrip().splitlines()[-1].startswith("Action:") for o in out[::2])
    assert not any(stop in o for o in out for stop in REACT_STOP)


def test_stop_only_matches_generated_text(backend, prompts):
    # The prompt ends "assistant\n" and the reply starts "Thought:"; a "\nThought:" stop must not fire there.
    out = backend.complete(prompts[:1], GenerationConfig(max_new_tokens=30, stop=["\nThought:"]))[0]
    assert out.startswith("Thought: I should") and "Action:" in out


def test_sampling_is_seeded_and_differs_from_greedy(backend, prompts):
    gen = GenerationConfig(max_new_tokens=20, temperature=5.0, seed=7)
    a, b = backend.complete(prompts, gen), backend.complete(prompts, gen)
    assert a == b
    assert a != backend.complete(prompts, GenerationConfig(max_new_tokens=20))


def test_max_batch_size_splits_batches_without_changing_output(backend, prompts):
    gen = GenerationConfig(max_new_tokens=16)
    full = backend.complete(prompts, gen)
    backend.max_batch_size = 3
    try:
        assert backend.complete(prompts, gen) == full
    finally:
        backend.max_batch_size = 32


def test_prefix_cache_prefills_only_new_tokens_and_changes_no_output(backend):
    from _react_model import golden_conversations

    games = golden_conversations(3)
    cached = LocalBackend(backend.model.name_or_path)
    plain = LocalBackend(backend.model.name_or_path, prefix_cache=False)
    assert cached.prefix_cache is not None and plain.prefix_cache is None and plain.packed_prefill
    gen = GenerationConfig(max_new_tokens=24)
    turns = min(len(g) for g in games) // 2
    for k in range(turns):  # each turn's prompt extends the last one, as in a rollout
        batch = [g[: 2 * k + 1] for g in games]
        assert cached.complete(batch, gen) == plain.complete(batch, gen)
    # a truncated history (oldest step dropped) shares only the head with what is cached
    cut = [g[:1] + g[3 : 2 * turns + 1] for g in games]
    assert cached.complete(cut, gen) == plain.complete(cut, gen)
    assert cached.prefill_tokens < plain.prefill_tokens / 2, (cached.prefill_tokens, plain.prefill_tokens)


def test_replies_are_not_prefilled_again_and_change_no_output(backend):
    """An agent's next prompt repeats its reply: the keys and values computed while decoding it are reused."""
    from _react_model import golden_conversations

    reuse = LocalBackend(backend.model.name_or_path)
    plain = LocalBackend(backend.model.name_or_path, reuse_replies=False)
    gen = GenerationConfig(max_new_tokens=24, stop=REACT_STOP)
    # the rows differ (else a row would reuse another's reply within the batch, with or without this)
    convs = [[{"role": "user", "content": f"{g[0]['content']}\nEpisode {i}."}]
             for i, g in enumerate(golden_conversations(3))]
    replies = 0
    for turn in range(3):
        out = reuse.complete(convs, gen)
        assert out == plain.complete(convs, gen)
        convs = [c + [{"role": "assistant", "content": r}, {"role": "user", "content": f"Observation: {turn}."}]
                 for c, r in zip(convs, out)]
        replies += sum(len(reuse.tokenizer(r, add_special_tokens=False)["input_ids"]) for r in out) * (turn < 2)
    saved = plain.prefill_tokens - reuse.prefill_tokens
    print(f"saved {saved} of {replies} reply tokens")
    assert replies > 0 and 0.8 * replies <= saved <= replies + 6, (saved, replies)  # 6: two tokens per row of slack


def test_prefix_cache_keeps_to_its_byte_budget_and_changes_no_output(backend):
    """The prefix cache drops its oldest entries beyond `prefix_cache_gb`: replies stay the same, only more is
    prefilled again."""
    from _react_model import golden_conversations

    unbounded = LocalBackend(backend.model.name_or_path)
    convs = [[{"role": "user", "content": f"{g[0]['content']}\nEpisode {i}."}]
             for i, g in enumerate(golden_conversations(3))]
    gen = GenerationConfig(max_new_tokens=24, stop=REACT_STOP)
    unbounded.complete(convs, gen)
    one_entry = max(unbounded.prefix_cache.entry_nbytes(layers) for _, layers in unbounded.prefix_cache.entries)
    bounded = LocalBackend(backend.model.name_or_path, prefix_cache_gb=1.5 * one_entry / 2**30)
    unbounded = LocalBackend(backend.model.name_or_path)
    for turn in range(3):
        out = bounded.complete(convs, gen)
        assert out == unbounded.complete(convs, gen)
        assert bounded.prefix_cache.nbytes() <= 1.5 * one_entry and len(bounded.prefix_cache.entries) >= 1
        assert len(unbounded.prefix_cache.entries) >= 3
        convs = [c + [{"role": "assistant", "content": r}, {"role": "user", "content": f"Observation: {turn}."}]
                 for c, r in zip(convs, out)]
    assert bounded.prefill_tokens > unbounded.prefill_tokens


def test_prefix_cache_finds_the_longest_common_prefix():
    from steptune.backends.local import _PrefixCache

    cache = _PrefixCache(capacity=8)
    for ids, name in (([1, 3], "a"), ([1, 2, 9, 9, 9], "b"), ([1, 2, 3, 4, 5, 6], "c"), ([7, 8], "d"),
                      ([1, 2, 3, 4, 0], "e")):
        cache.add(ids, name)
    assert cache.longest_prefix([5, 5]) == (0, None)
    assert cache.longest_prefix([1, 2, 3, 4, 5, 6, 7]) == (6, "c")  # a whole earlier prompt: taken out
    assert [n for _, n in cache.entries] == ["a", "b", "d", "e"]
    assert cache.longest_prefix([1, 2, 3, 4, 1]) == (4, "e")  # the longest partial match, kept for its owner
    assert cache.longest_prefix([1, 2, 9, 9, 1]) == (4, "b")
    assert [n for _, n in cache.entries] == ["a", "d", "e", "b"]
    assert cache.longest_prefix([1, 3, 5]) == (2, "a")
    assert [n for _, n in cache.entries] == ["d", "e", "b"]


def test_cut_at_stop_uses_earliest_stop():
    assert cut_at_stop("a\nAction: x\nObservation: y\n\nz", REACT_STOP) == "a\nAction: x"
    assert cut_at_stop("no stops", ["\n"]) == "no stops"


def test_backend_specs():
    assert parse_backend_spec("runs/base") == BackendConfig(kind="local", model="runs/base")
    assert parse_backend_spec("local:/m") == BackendConfig(kind="local", model="/m")
    cfg = parse_backend_spec("openai:teacher@http://127.0.0.1:9/v1")
    assert (cfg.kind, cfg.model, cfg.base_url) == ("openai", "teacher", "http://127.0.0.1:9/v1")
    with pytest.raises(ValueError, match="openai:MODEL@BASE_URL"):
        parse_backend_spec("openai:teacher")
    with pytest.raises(ValueError, match="base_url"):
        make_backend(BackendConfig(kind="openai", model="x"))


def test_make_backend_builds_local(tiny_model_dir):
    b = make_backend(f"local:{tiny_model_dir}")
    assert isinstance(b, LocalBackend) and len(b.complete([[{"role": "user", "content": "hi"}]],
                                                           GenerationConfig(max_new_tokens=3))) == 1


def test_backend_config_dtype_loads_bf16_weights_that_play_the_same_first_turns(tmp_path_factory, backend, prompts):
    """`dtype: bfloat16` (the faster choice on a CPU with native bf16 matmuls) reaches the local backend; the
    trained agent's first turns keep their actions."""
    import torch

    bf16 = make_backend(BackendConfig(model=str(react_model_fixture(tmp_path_factory)), dtype="bfloat16"))
    assert bf16.model.dtype == torch.bfloat16 and backend.model.dtype == torch.float32
    gen = GenerationConfig(max_new_tokens=60, stop=REACT_STOP)
    assert [parse_react(o).action for o in bf16.complete(prompts, gen)[::2]] == ["take coin", "take coin"]
    with pytest.raises(ValueError, match="dtype"):
        BackendConfig(model="m", dtype="bf16")


def test_packed_prefill_equals_padded_batch_prefill(backend, prompts):
    assert backend.packed_prefill  # the CPU default for plain causal decoders
    padded = LocalBackend(backend.model.name_or_path, packed_prefill=False)
    for gen in (GenerationConfig(max_new_tokens=30), GenerationConfig(max_new_tokens=30, temperature=2.0, seed=3)):
        assert backend.complete(prompts, gen) == padded.complete(prompts, gen)


def test_packed_prefill_only_for_caches_that_keep_every_position():
    from transformers import LlamaConfig, MistralConfig

    from steptune.backends.local import _full_attention_only

    assert _full_attention_only(LlamaConfig()) and _full_attention_only(MistralConfig(sliding_window=None))
    assert not _full_attention_only(MistralConfig(sliding_window=16))


def test_rows_of_one_batch_share_their_prefixes(backend):
    """A prompt that continues another row of the same batch (or repeats it) is computed once."""
    from _react_model import golden_conversations

    from steptune.backends.prompt_tokens import common_prefix_len

    game = golden_conversations(1)[0]
    batch = [game[:1], game[:1], game[:3]]
    fresh = LocalBackend(backend.model.name_or_path)
    plain = LocalBackend(backend.model.name_or_path, prefix_cache=False)
    gen = GenerationConfig(max_new_tokens=12)
    assert fresh.complete(batch, gen) == plain.complete(batch, gen)
    first, _, longer = (fresh.encode(c)[:-1] for c in batch)
    assert common_prefix_len(longer, first) > 0.5 * len(first)
    assert fresh.prefill_tokens == len(first) + len(longer) - common_prefix_len(longer, first)
    assert plain.prefill_tokens == 2 * len(first) + len(longer)  # without the cache: every prompt whole


def test_stop_check_decodes_generated_tails_as_batch_decode_does(tiny_model_dir):
    from transformers import AutoTokenizer

    from steptune.backends.local import _StopOnStrings

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    prompt = tok("Thought: go\nAction: take coin\n\nObservation: ok", add_special_tokens=False)["input_ids"]
    specials = sorted(tok.all_special_ids)
    rows = [prompt + prompt[i:] + specials[: i % 3] for i in range(4)]  # special tokens are dropped from the text
    stop = _StopOnStrings(tok, REACT_STOP)
    assert stop.rust is not None  # the Rust path is the one under test
    assert [stop.decode_tail(r) for r in rows] == tok.batch_decode([r[-stop.tail :] for r in rows],
                                                                   skip_special_tokens=True)
    assert [stop.hit(r) for r in rows] == [any(s in t for s in REACT_STOP) for t in
                                           tok.batch_decode([r[-stop.tail :] for r in rows], skip_special_tokens=True)]
    assert stop.hit(prompt)  # "\nObservation:" ends it
    tok.clean_up_tokenization_spaces = True  # transformers would then change the text after decoding: its own path
    assert _StopOnStrings(tok, REACT_STOP).rust is None


def test_decoding_equals_transformers_generate(backend, prompts):
    """The decode loop is transformers' greedy `generate`, token for token (eos ends a row), on a padded batch."""
    import torch

    tok, model = backend.tokenizer, backend.model
    rows = [backend.encode(c) for c in prompts]
    width = max(map(len, rows))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(r) for r in rows])[:, None]).long()
    with torch.inference_mode():
        ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=40, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, temperature=None,
                             top_p=None, top_k=None)[:, width:]
    expected = tok.batch_decode(ref, skip_special_tokens=True)
    for packed in (True, False):
        b = LocalBackend(model.name_or_path, packed_prefill=packed)
        assert b.complete(prompts, GenerationConfig(max_new_tokens=40)) == expected


def test_sampling_seeds_follow_their_conversations_across_calls(tmp_path_factory, prompts):
    """More conversations than one call takes: each still samples with its own seed."""
    small = LocalBackend(react_model_fixture(tmp_path_factory), max_batch_size=2)
    gen = GenerationConfig(max_new_tokens=20, temperature=2.0, row_seeds=[11, 12, 13, 14, 15])
    batch = (prompts * 2)[:5]
    alone = [small.complete([c], GenerationConfig(**{**gen.__dict__, "row_seeds": [s]}))[0]
             for c, s in zip(batch, gen.row_seeds)]
    assert small.complete(batch, gen) == alone


def test_finished_rows_leave_the_batch(backend, prompts):
    """A row that has hit its stop no longer runs through the model; what every row generates is unchanged."""
    batch = prompts * 2
    # hot sampling with a stop on common letters: rows end after different numbers of tokens
    gen = GenerationConfig(max_new_tokens=30, stop=["o", "e"], temperature=3.0, row_seeds=list(range(len(batch))))
    sizes = []
    hook = backend.model.register_forward_pre_hook(lambda m, a, kw: sizes.append(kw["input_ids"].shape),
                                                   with_kwargs=True)
    try:
        replies = backend.complete(batch, gen)
    finally:
        hook.remove()
    decode_rows = [s[0] for s in sizes if s[1] == 1]
    assert decode_rows[0] == len(batch) and decode_rows[-1] < len(batch), decode_rows
    assert decode_rows == sorted(decode_rows, reverse=True)
    assert len(set(map(len, replies))) > 2
    alone = [backend.complete([c], GenerationConfig(**{**gen.__dict__, "row_seeds": [seed]}))[0]
             for c, seed in zip(batch, gen.row_seeds)]
    assert replies == alone
