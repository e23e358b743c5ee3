"""Attention for padding-free packed rows that costs what its samples cost.

transformers' `sdpa` path turns a packed row into one dense (L x L) block-diagonal mask and computes all L² scores;
for a 4096-token row holding six trajectories most of that work is thrown away, and a masked SDPA cannot use the
fused causal kernel. This implementation runs SDPA once per sample with `is_causal=True` instead (what FlashAttention's
varlen kernel does on a GPU), so packing pays only for sum(len²). Registered with transformers' own
`AttentionInterface` / `AttentionMaskInterface` under `steptune_packed_sdpa`; anything that is not an unpadded,
cache-free forward (generation, padded batches) goes through the stock `sdpa` code untouched.

Inference uses the same row for prefill (a list of `PackedPrompt` passed as the forward's `packed_prompts`): the
new tokens of many prompts go through the model in one forward, and each prompt attends to its own tokens and to a
prefix whose keys and values are already known. One forward instead of one per prompt saves the model's fixed
per-call cost on every prompt but one; the attention itself costs what each prompt costs, as with unpadded prompts
one by one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

NAME = "steptune_packed_sdpa"

# Plain causal decoders: no mask tricks beyond causal + optional sliding window (Gemma-3 image tokens, Llama-4
# chunked attention and the like would be lost if the mask were dropped, so those keep stock sdpa).
SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "olmo2", "granite",
                                   "smollm3"})


def _sample_bounds(query: torch.Tensor, kwargs: dict) -> list[tuple[int, int]]:
    length = query.shape[2]
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        position_ids = kwargs.get("position_ids")
        if position_ids is None or position_ids.shape[0] != 1:
            return [(0, length)]
        starts = (position_ids[0] == 0).nonzero().flatten()
        cu = torch.cat([starts, torch.tensor([length], device=starts.device)])
        if len(cu) == 1 or cu[0] != 0:
            return [(0, length)]
    cu = cu.tolist()
    return [(s, e) for s, e in zip(cu[:-1], cu[1:]) if e > s]


@dataclass
class PackedPrompt:
    """Tokens [start, end) of a packed prefill row: one prompt's tokens after its first `prefix_len`, whose keys and
    values per layer are in `prefix`. The forward appends the whole prompt's (keys, values) of each layer to `kv`.

    `prefix` may be another prompt's `kv` that the same forward fills: prompts are processed in row order layer by
    layer, so an earlier prompt of the row has its layer's keys ready when a later one reads them."""

    start: int
    end: int
    prefix_len: int = 0
    prefix: list | None = None
    kv: list = field(default_factory=list)
    mask: torch.Tensor | None = None  # built at the first layer, reused by the others


def prefill_prompts(module, query, key, value, prompts: list[PackedPrompt], dropout=0.0, scaling=None, window=None):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    layer = module.layer_idx
    # SDPA's own grouped-query attention: on a CPU it is ~8% faster than transformers' repeated key/value heads when
    # there is a mask (transformers uses it only without one, for the sake of CUDA kernels)
    own_gqa = query.device.type == "cpu" and getattr(module, "num_key_value_groups", 1) > 1
    outputs = []
    for p in prompts:
        k, v = key[:, :, p.start : p.end], value[:, :, p.start : p.end]
        if p.prefix_len:
            prefix_keys, prefix_values = p.prefix[layer]
            k = torch.cat([prefix_keys[:, :, : p.prefix_len], k], dim=2)
            v = torch.cat([prefix_values[:, :, : p.prefix_len], v], dim=2)
        p.kv.append((k, v))
        if p.end == p.start:  # wholly cached: nothing to attend from
            continue
        if p.mask is None and (p.prefix_len or (window is not None and p.end - p.start > window)):
            p.mask = prefix_causal_mask(p.prefix_len, p.end - p.start, window, query.dtype, query.device)
        q = query[:, :, p.start : p.end]
        if own_gqa:
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=p.mask, dropout_p=dropout,
                                                                   scale=scaling, is_causal=p.mask is None,
                                                                   enable_gqa=True).transpose(1, 2)
        else:
            out, _ = sdpa_attention_forward(module, q, k, v, p.mask, dropout=dropout, scaling=scaling,
                                            is_causal=p.mask is None)
        outputs.append(out)
    return torch.cat(outputs, dim=1), None


def prefix_causal_mask(prefix_len: int, new: int, window: int | None, dtype, device) -> torch.Tensor:
    """The additive mask of `new` tokens that follow `prefix_len` known ones: all of the prefix (within the sliding
    window, if any), causal among the new."""
    # built from blocks: comparing index grids costs ~6x more, and this runs once per prompt
    lowest = torch.finfo(dtype).min
    mask = torch.zeros(1, 1, new, prefix_len + new, dtype=dtype, device=device)
    mask[0, 0, :, prefix_len:] = torch.full((new, new), lowest, dtype=dtype, device=device).triu(1)
    if window is not None:  # query i sits at prefix_len + i and sees keys j > prefix_len + i - window
        too_old = torch.ones(new, prefix_len + new, dtype=torch.bool, device=device).tril(prefix_len - window)
        mask[0, 0].masked_fill_(too_old, lowest)
    return mask


def decode_attention(module, query, key, value, attention_mask, scaling=None):
    """One new token per row against its cache, in bf16 on a CPU: transformers' eager attention (scores in
    the model's dtype, softmax in fp32), with each key/value head's query heads as rows of one matmul instead of
    repeated keys and values. PyTorch's CPU SDPA kernel is tiled for long queries: in bf16 with a 16-row batch
    over 2,048 cached tokens it took 2.5x this (6.6 vs 2.6 ms a layer), and decode attention was 59% of a SmolLM2
    evaluation's time (`benchmarks/decode_attention.py`, docs/smollm2.md)."""
    batch, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    query = query.reshape(batch, kv_heads, heads // kv_heads, dim)
    scores = torch.matmul(query, key.transpose(2, 3)) * (dim**-0.5 if scaling is None else scaling)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    out = torch.matmul(probs, value)  # (batch, kv_heads, query heads per kv head, dim)
    return out.reshape(batch, heads, 1, dim).transpose(1, 2).contiguous(), None


def packed_sdpa_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if (prompts := kwargs.get("packed_prompts")) is not None:
        return prefill_prompts(module, query, key, value, prompts, dropout, scaling, kwargs.get("sliding_window"))
    if query.shape[2] == 1 and query.device.type == "cpu" and query.dtype == torch.bfloat16 and not dropout:
        return decode_attention(module, query, key, value, attention_mask, scaling)
    unmasked_prefill = attention_mask is None and query.shape[2] == key.shape[2] and query.shape[2] > 1
    if not unmasked_prefill or query.shape[0] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    window = kwargs.get("sliding_window")
    outputs = []
    for start, end in _sample_bounds(query, kwargs):
        mask = None
        if window is not None and end - start > window:
            mask = prefix_causal_mask(0, end - start, window, query.dtype, query.device)
        out, _ = sdpa_attention_forward(module, query[:, :, start:end], key[:, :, start:end],
                                        value[:, :, start:end], mask, dropout=dropout, scaling=scaling,
                                        is_causal=mask is None)
        outputs.append(out)
    return torch.cat(outputs, dim=1), None


def packed_sdpa_mask(*args, attention_mask=None, q_length=None, kv_length=None, **kwargs):
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None and q_length == kv_length and kwargs.get("q_offset", 0) == 0:
        return None  # the attention function finds the sample boundaries itself
    return sdpa_mask(*args, attention_mask=attention_mask, q_length=q_length, kv_length=kv_length, **kwargs)


def register() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, packed_sdpa_forward)
    AttentionMaskInterface.register(NAME, packed_sdpa_mask)
    return NAME


def use_packed_attention(model) -> bool:
    """Switch `model` to per-sample attention if it is a plain causal decoder on stock sdpa; True if switched."""
    config = model.config
    if config.model_type not in SUPPORTED_MODEL_TYPES or config._attn_implementation != "sdpa":
        return False
    model.set_attn_implementation(register())
    return True
