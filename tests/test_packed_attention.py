"""Per-sample attention on packed rows computes exactly what each sample computes on its own."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig

from steptune.models.packed_attention import NAME, use_packed_attention

LENGTHS = [30, 7, 50]  # three samples in one row; the Mistral window (16) is shorter than two of them


def tiny(config_cls, **kw):
    torch.manual_seed(0)
    config = config_cls(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa", **kw)
    return AutoModelForCausalLM.from_config(config)


def packed_row():
    torch.manual_seed(1)
    ids = torch.randint(0, 300, (1, sum(LENGTHS)))
    position_ids = torch.cat([torch.arange(n) for n in LENGTHS])[None]
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    return ids, position_ids, cu


@pytest.mark.parametrize("config_cls,kw", [(LlamaConfig, {}), (MistralConfig, {"sliding_window": 16})],
                         ids=["llama-gqa", "mistral-sliding-window"])
@pytest.mark.parametrize("boundaries", ["position_ids", "cu_seq_lens"])
def test_packed_row_matches_each_sample_alone(config_cls, kw, boundaries):
    model = tiny(config_cls, **kw)
    model.config.use_cache = False
    ids, position_ids, cu = packed_row()
    starts = cu.tolist()
    # reference: stock sdpa, every sample in its own forward pass
    ref_logits, ref_grads = [], None
    model.zero_grad()
    for a, b in zip(starts, starts[1:]):
        logits = model(input_ids=ids[:, a:b]).logits
        logits.square().mean().backward()
        ref_logits.append(logits.detach())
    ref_grads = [p.grad.clone() for p in model.parameters()]

    assert use_packed_attention(model) and model.config._attn_implementation == NAME
    extra = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max(LENGTHS), "max_length_k": max(LENGTHS)}
    model.zero_grad()
    logits = model(input_ids=ids, position_ids=position_ids, **(extra if boundaries == "cu_seq_lens" else {})).logits
    sum(logits[:, a:b].square().mean() for a, b in zip(starts, starts[1:])).backward()
    for (a, b), ref in zip(zip(starts, starts[1:]), ref_logits):
        torch.testing.assert_close(logits[:, a:b].detach(), ref, atol=1e-5, rtol=1e-5)
    for p, ref in zip(model.parameters(), ref_grads):
        torch.testing.assert_close(p.grad, ref, atol=1e-5, rtol=1e-4)


def test_generation_and_padded_batches_keep_stock_sdpa_results():
    model = tiny(LlamaConfig).eval()
    ids = torch.randint(0, 300, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    with torch.no_grad():
        stock_logits = model(input_ids=ids, attention_mask=mask).logits
        stock_gen = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        use_packed_attention(model)
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, stock_logits)
        assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False), stock_gen)


def test_other_architectures_and_explicit_choices_are_left_alone():
    eager = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                                                         num_hidden_layers=1, num_attention_heads=2,
                                                         attn_implementation="eager"))
    assert not use_packed_attention(eager) and eager.config._attn_implementation == "eager"


@pytest.mark.parametrize("config_cls,kw", [(LlamaConfig, {}), (MistralConfig, {"sliding_window": 16})],
                         ids=["llama-gqa", "mistral-sliding-window"])
def test_packed_prompts_continue_known_prefixes(config_cls, kw):
    """Inference prefill: three prompts in one row: one from scratch, one continuing keys/values computed earlier,
    one continuing the first prompt of the same row. Keys, values and logits equal each prompt's own forward."""
    from steptune.models.packed_attention import PackedPrompt

    model = tiny(config_cls, **kw).eval()
    torch.manual_seed(2)
    a, b = torch.randint(0, 300, (1, 30)), torch.randint(0, 300, (1, 25))
    c = torch.cat([a[:, :20], torch.randint(0, 300, (1, 20))], dim=1)  # shares a's first 20 tokens
    with torch.no_grad():
        alone = [model(input_ids=x, use_cache=True) for x in (a, b, c)]
        b_head = model(input_ids=b[:, :10], use_cache=True).cache
        use_packed_attention(model)
        prompts = [PackedPrompt(0, 30), PackedPrompt(30, 45, 10, [(l.keys, l.values) for l in b_head.layers])]
        prompts.append(PackedPrompt(45, 65, 20, prompts[0].kv))
        ids = torch.cat([a, b[:, 10:], c[:, 20:]], dim=1)
        positions = torch.cat([torch.arange(30), torch.arange(10, 25), torch.arange(20, 40)])[None]
        logits = model(input_ids=ids, position_ids=positions, packed_prompts=prompts).logits
    for p, ref in zip(prompts, alone):
        torch.testing.assert_close(logits[:, p.start : p.end], ref.logits[:, p.prefix_len :], atol=1e-5, rtol=1e-5)
        assert len(p.kv) == len(ref.cache.layers)
        for (k, v), layer in zip(p.kv, ref.cache.layers):
            kept = layer.keys.shape[2]  # a sliding-window cache keeps only the newest keys
            assert kept == k.shape[2] or kw
            torch.testing.assert_close(k[:, :, -kept:], layer.keys, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(v[:, :, -kept:], layer.values, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mask_kind", ["bool", "additive", "none"])
@pytest.mark.parametrize("groups", [1, 3])
def test_bf16_decode_attention_is_attention(mask_kind, groups):
    """One query token per row over a left-padded cache: the bf16 decode path equals fp64 attention to bf16
    precision, with grouped key/value heads and each mask form transformers passes."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from steptune.models.packed_attention import decode_attention

    class Layer(torch.nn.Module):
        num_key_value_groups = groups

    g = torch.Generator().manual_seed(groups)
    q = torch.randn(4, 3 * groups, 1, 16, generator=g)
    k, v = torch.randn(4, 3, 40, 16, generator=g), torch.randn(4, 3, 40, 16, generator=g)
    keep = torch.ones(4, 1, 1, 40, dtype=torch.bool)
    keep[1, ..., :25] = False  # left padding
    keep[3, ..., :39] = False  # a row with one key
    mask = {"bool": keep, "additive": torch.zeros(keep.shape).masked_fill(~keep, -1e9), "none": None}[mask_kind]

    def mask_as(dtype):  # an additive mask in the attention's dtype; a boolean one as it is
        return mask.to(dtype) if mask is not None and mask.dtype != torch.bool else mask

    ref = sdpa_attention_forward(Layer(), q.double(), k.double(), v.double(), mask_as(torch.float64))[0]
    out = decode_attention(Layer(), q.bfloat16(), k.bfloat16(), v.bfloat16(), mask_as(torch.bfloat16))[0]
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape == (4, 1, 3 * groups, 16)
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)
    if mask_kind != "none":  # the padded keys were not attended to: a changed padded value moves nothing
        v2 = v.clone()
        v2[1, :, :25] = 100.0
        again = decode_attention(Layer(), q.bfloat16(), k.bfloat16(), v2.bfloat16(), mask_as(torch.bfloat16))[0]
        assert torch.equal(again, out)


def test_bf16_generation_takes_the_decode_path_and_matches_eager_attention():
    """A bf16 model on packed attention decodes through `decode_attention` and gets transformers' eager-attention
    logits at every decoding step (the same formula), on a left-padded batch."""
    from unittest import mock

    from steptune.models import packed_attention

    model = tiny(LlamaConfig).eval().to(torch.bfloat16)
    ids = torch.randint(0, 300, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        model.set_attn_implementation("eager")
        eager = model.generate(ids, **kw)
        use_packed_attention(model.set_attn_implementation("sdpa") or model)
        with mock.patch.object(packed_attention, "decode_attention", wraps=packed_attention.decode_attention) as spy:
            ours = model.generate(ids, **kw)
    assert spy.call_count == 5 * model.config.num_hidden_layers  # every decoding step after the prefill, every layer
    assert torch.equal(ours.sequences, eager.sequences)
    for a, b in zip(ours.logits, eager.logits):
        torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-2)
