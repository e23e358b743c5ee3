"""Attention for padding-free packed rows that costs what its samples cost.

transformers' `sdpa` path turns a packed row into one dense (L x L) block-diagonal mask and computes all L² scores;
for a 4096-token row holding six trajectories most of that work is thrown away, and a masked SDPA cannot use the
fused causal kernel. This implementation runs SDPA once per sample with `is_causal=True` instead (what FlashAttention's
varlen kernel does on a GPU), so packing pays only for sum(len²). Registered with transformers' own
`AttentionInterface` / `AttentionMaskInterface` under `steptune_packed_sdpa`; anything that is not an unpadded,
cache-free forward (generation, padded batches) goes through the stock `sdpa` code untouched.
"""

from __future__ import annotations

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


def packed_sdpa_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    unmasked_prefill = attention_mask is None and query.shape[2] == key.shape[2] and query.shape[2] > 1
    if not unmasked_prefill or query.shape[0] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    window = kwargs.get("sliding_window")
    outputs = []
    for start, end in _sample_bounds(query, kwargs):
        mask = None
        if window is not None and end - start > window:
            i = torch.arange(end - start, device=query.device)
            mask = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < window)
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
