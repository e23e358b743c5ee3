"""In-process transformers backend: a batch of conversations is prefilled and decoded together; a row that has
finished leaves the batch."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from steptune.backends.base import ChatBackend, Conversation, GenerationConfig
from steptune.backends.prompt_tokens import PromptEncoder, common_prefix_len


def cut_at_stop(text: str, stop: list[str]) -> str:
    """Cut `text` at the earliest stop string (the stop string itself is dropped)."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]


class _StopOnStrings:
    """Per-row stop on strings in the *generated* text only (a stop like "\\nThought:" must not fire on a reply that
    starts "Thought:" right after the prompt)."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        # a stop string that appears now ends within the newest token, so decoding a tail as long as the longest
        # stop (every token is at least one character) finds it; +1 for tokens that only decode with a neighbour
        self.tail = max(len(s) for s in stop) + 1
        # This runs after every generated token. transformers' batch_decode spends ~10x the Rust decode in Python
        # (argument handling per row: 5% of a tiny model's evaluation), so rows go to the Rust tokenizer directly
        # when that gives the same text: a fast tokenizer that does not clean up spaces after decoding.
        backend = getattr(tokenizer, "_tokenizer", None)
        self.rust = backend if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", True) \
            else None

    def decode_tail(self, generated: list[int]) -> str:
        tail = generated[-self.tail :]
        if self.rust is None:
            return self.tokenizer.decode(tail, skip_special_tokens=True)
        return self.rust.decode(tail, skip_special_tokens=True)

    def hit(self, generated: list[int]) -> bool:
        text = self.decode_tail(generated)
        return any(s in text for s in self.stop)


class LocalBackend(ChatBackend):
    """Left padding so every row's next token sits at the same position; KV cache on; `dtype` auto: fp32 on a CPU
    (bfloat16 is faster on one with native bf16 matmuls, far slower on one without: steptune.models.precision)."""

    def __init__(self, model_path: str | Path, device: str | None = None, dtype: str = "auto",
                 max_batch_size: int = 32, adapter: str | Path | None = None,
                 packed_prefill: bool | None = None, prefix_cache: bool | None = None, reuse_replies: bool = True,
                 prefix_cache_gb: float = 2.0):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from steptune.models.packed_attention import use_packed_attention

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dtype == "auto":
            torch_dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        else:
            torch_dtype = getattr(torch, dtype)
            if torch_dtype == torch.bfloat16 and self.device == "cpu":
                from steptune.models.precision import warn_if_bf16_is_emulated

                warn_if_bf16_is_emulated("the local backend")
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
        self.prompts = PromptEncoder(self.tokenizer, capacity=4 * max_batch_size)
        self.context_window = getattr(self.model.config, "max_position_embeddings", None)
        self.tokens_generated = 0
        # On CPU a padded batch prefill costs more than the prompts themselves (mask building and masked attention
        # over the padding dominate), so the prompts' tokens go through the model unpadded, packed into one row with
        # per-prompt attention, and their caches are then left-padded into one batch that decodes together.
        if packed_prefill is None:
            packed_prefill = self.device == "cpu"
        self.packed_prefill = packed_prefill and _full_attention_only(self.model.config) and \
            use_packed_attention(self.model)
        # An agent's prompt is its previous prompt plus the reply and the new observation, so the packed prefill
        # keeps each prompt's KV cache and later prefills only the tokens past the longest cached prefix. Causal
        # attention makes a prefix's keys/values independent of what follows, so the result is the same.
        # Bounded in bytes as well: SmolLM2's keys and values take 46 KB a token, so 64 conversations of ~1,000
        # tokens held 3 GB, and a 1.7B model's would not fit in memory at all (oldest entries go first).
        self.prefix_cache = _PrefixCache(2 * max_batch_size, int(prefix_cache_gb * 2**30)) \
            if self.packed_prefill and prefix_cache is not False else None
        self.prefill_tokens = 0  # prompt tokens actually run through the model (what the prefix cache saves)
        # the cache also keeps each reply's keys and values, computed while decoding it (an agent's next prompt
        # repeats its reply: a third of a ReAct turn's new tokens)
        self.reuse_replies = reuse_replies

    def render(self, conversation: Conversation) -> str:
        return self.prompts.render(conversation)

    def encode(self, conversation: Conversation) -> list[int]:
        """The prompt's token ids; remembered, because the rollout counts a prompt's tokens (for the context
        window) just before it asks for the completion, and reused for the next turn's prompt."""
        return self.prompts.encode(conversation)

    def count_tokens(self, conversation: Conversation) -> int:
        return len(self.encode(conversation))

    def complete(self, conversations: list[Conversation], gen: GenerationConfig) -> list[str]:
        out: list[str] = []
        for i in range(0, len(conversations), self.max_batch_size):
            part = slice(i, i + self.max_batch_size)
            seeds = None if gen.row_seeds is None else gen.row_seeds[part]  # each conversation keeps its own
            out.extend(self._generate(conversations[part], dataclasses.replace(gen, row_seeds=seeds)))
        return out

    def _generate(self, conversations: list[Conversation], gen: GenerationConfig) -> list[str]:
        import numpy as np
        import torch

        rows = [self.encode(c) for c in conversations]
        width = max(len(r) for r in rows)
        # left padding; filled through numpy: torch.tensor on nested lists costs ~3 ms for 16 rows of 900 tokens
        padded = np.full((len(rows), width), self.tokenizer.pad_token_id, dtype=np.int64)
        seen = np.zeros((len(rows), width), dtype=np.int64)
        for i, r in enumerate(rows):
            padded[i, width - len(r) :] = r
            seen[i, width - len(r) :] = 1
        ids, mask = torch.from_numpy(padded).to(self.device), torch.from_numpy(seen).to(self.device)
        with torch.inference_mode():
            keep = None
            if self.packed_prefill and (len(rows) > 1 or self.prefix_cache is not None):
                cache, prompt_kv = self._prefill(rows, gen.max_new_tokens)
                ids = ids[:, -1:]  # the last prompt token decodes
                if self.prefix_cache is not None and self.reuse_replies:
                    keep = _KeepReplies(self.prefix_cache, rows, prompt_kv, width - 1)
            else:
                from transformers import DynamicCache

                cache = DynamicCache(config=self.model.config)
                self.prefill_tokens += int(mask.sum())
            new = self._decode(ids, mask, cache, gen, keep)
            if self.prefix_cache is not None:
                self.prefix_cache.trim()  # now that this call's prompts and replies are filled in
        self.tokens_generated += sum(map(len, new))
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return [cut_at_stop(t, gen.stop) for t in texts]

    def _decode(self, ids, mask, cache, gen: GenerationConfig, keep: _KeepReplies | None = None) -> list[list[int]]:
        """Each row's new tokens, up to eos, a stop string or `max_new_tokens`.

        `ids` holds what the cache lacks (a whole padded prompt, or each row's last prompt token after the packed
        prefill) and `mask` every position's padding. transformers' `generate` decodes every row until the last one
        ends, and a ReAct turn's length varies (about half of a batch's row-steps were for finished rows); here a
        finished row leaves the batch, so the matmuls and, more, the attention over its cache (at batch 32 of
        SmolLM2 the caches outweigh the weights) stop costing. With `keep`, each row's keys and values (its prompt and
        reply) go to the prefix cache before its cache row is dropped, so the next turn does not compute its reply
        again."""
        import torch

        n = ids.shape[0]
        out: list[list[int]] = [[] for _ in range(n)]
        live = list(range(n))  # original row of each batch row
        pick = _TokenPicker(gen, n, self.device)
        stop = _StopOnStrings(self.tokenizer, gen.stop) if gen.stop else None
        eos = self.tokenizer.eos_token_id
        prunable = isinstance(cache, _static_cache_type()) and _full_attention_only(self.model.config)
        batch_rows = n  # rows the cache holds (finished ones until the next compaction)
        kept = torch.arange(n, device=self.device)  # cache row of each live row
        for _ in range(gen.max_new_tokens):
            positions = (mask.cumsum(-1) - 1).clamp_(min=0)[:, -ids.shape[1] :]
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                                use_cache=True, logits_to_keep=1).logits[:, -1].float()
            if len(live) < batch_rows:
                logits = logits[kept]
            tokens = pick(logits, live)
            still = []
            for i, (row, token) in enumerate(zip(live, tokens.tolist())):
                out[row].append(token)
                if token != eos and not (stop and stop.hit(out[row])):
                    still.append(i)
            if not still:
                break
            if len(still) < len(live):
                live = [live[i] for i in still]
                kept = kept[still]
                tokens = tokens[still]
            if len(live) <= 0.75 * batch_rows:
                # drop finished rows (and left padding no live row needs) once a quarter of the cache is theirs:
                # the copy costs about what one decode step's attention reads, and every later step saves it
                if keep is not None:
                    keep.leaving(cache, out, set(live))
                mask = mask[kept]
                cut = int((mask.cumsum(-1) == 0).sum(-1).min()) if prunable else 0
                _select_cache(cache, kept, cut)
                if keep is not None:
                    keep.compacted(live, cut)
                mask = mask[:, cut:]
                batch_rows, kept = len(live), torch.arange(len(live), device=self.device)
            # finished rows still in the cache decode a padding token whose result is never read
            step = torch.full((batch_rows, 1), self.tokenizer.pad_token_id, dtype=ids.dtype, device=self.device)
            step[kept, 0] = tokens
            ids = step
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        if keep is not None:
            keep.leaving(cache, out, set())
        return out

    def _prefill(self, rows: list[list[int]], max_new_tokens: int):
        """A cache for all but the last prompt token of each row (generate feeds that one), left-padded, and each
        prompt's own keys and values (those the prefix cache holds).

        Each prompt continues the longest prefix whose keys/values are known, from an earlier call or from an earlier
        row of this batch, and all rows' remaining tokens go through the model in one packed forward
        (steptune.models.packed_attention). Left-padded cache slots are masked by `attention_mask` during decoding,
        and the cached keys carry the same rotary positions (0..n-1 per row) that generate derives from the mask, so
        the result equals a padded batch prefill (checked by tests/test_backends.py)."""
        import torch
        from transformers import StaticCache

        from steptune.models.packed_attention import PackedPrompt

        prompts, ids, positions = [], [], []
        for row_ids in rows:
            prompt_ids = row_ids[:-1]
            start, prefix = self.prefix_cache.longest_prefix(prompt_ids) if self.prefix_cache else (0, None)
            prompt = PackedPrompt(len(ids), len(ids) + len(prompt_ids) - start, start, prefix)
            ids.extend(prompt_ids[start:])
            positions.extend(range(start, len(prompt_ids)))
            if self.prefix_cache is not None:  # filled by the forward below, in time for later rows that continue it
                self.prefix_cache.add(prompt_ids, prompt.kv)
            prompts.append(prompt)
        try:
            if ids:
                self.model(input_ids=torch.tensor([ids], device=self.device), use_cache=False, logits_to_keep=1,
                           position_ids=torch.tensor([positions], device=self.device), packed_prompts=prompts)
            else:  # every prompt wholly cached
                for p in prompts:
                    p.kv.extend((k[:, :, : p.prefix_len], v[:, :, : p.prefix_len]) for k, v in p.prefix)
        except BaseException:
            if self.prefix_cache is not None:
                self.prefix_cache.entries.clear()  # this batch's entries may be half filled
            raise
        self.prefill_tokens += len(ids)
        # a preallocated cache: decoding writes each new token in place instead of concatenating every layer's
        # whole cache at every step (a third of a batched decode step on a CPU). Each row is written straight
        # into its left-padded place (padded and stacked copies first made batched generation 9% slower).
        width = max(len(r) for r in rows) - 1
        cache = StaticCache(config=self.model.config, max_cache_len=width + max_new_tokens)
        keys0 = [k for k, _ in prompts[0].kv]
        cache.early_initialization(len(prompts), [k.shape[1] for k in keys0], [k.shape[3] for k in keys0],
                                   self.model.dtype, self.device)
        for i, layer in enumerate(cache.layers):
            for row, prompt in enumerate(prompts):
                k, v = prompt.kv[i]
                layer.keys[row, :, width - k.shape[2] : width] = k[0]
                layer.values[row, :, width - v.shape[2] : width] = v[0]
            layer.cumulative_length.fill_(width)  # what `update` would have counted
        return cache, [p.kv for p in prompts]


class _TokenPicker:
    """The next token of each live row: greedy, or sampled (temperature, then top-p).

    With `row_seeds` each row draws from its own generator, so what a row samples depends on its seed alone, not on
    the rows it is batched with nor on when they finish; otherwise one generator (torch's, seeded with `seed` when
    given) draws for the batch."""

    def __init__(self, gen: GenerationConfig, n: int, device):
        import torch

        self.temperature, self.top_p = gen.temperature, gen.top_p
        self.generators = None
        if gen.temperature > 0 and gen.row_seeds is not None:
            self.generators = [torch.Generator(device).manual_seed(s) for s in gen.row_seeds]
        elif gen.temperature > 0 and gen.seed is not None:
            torch.manual_seed(gen.seed)

    def __call__(self, logits, live: list[int]):
        import torch

        if self.temperature <= 0:
            return logits.argmax(-1)
        probs = torch.softmax(logits / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            drop = sorted_probs.cumsum(-1) - sorted_probs > self.top_p  # keep the smallest set reaching top_p
            probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
        if self.generators is None:
            return torch.multinomial(probs, 1)[:, 0]
        return torch.cat([torch.multinomial(p, 1, generator=self.generators[row]) for p, row in zip(probs, live)])


def _static_cache_type():
    from transformers import StaticCache

    return StaticCache


def _select_cache(cache, rows, cut: int) -> None:
    """Keep only `rows` of every layer's keys and values, and drop the first `cut` positions (left padding no kept
    row has tokens in: a static cache then attends over fewer slots)."""
    if not cut:
        cache.reorder_cache(rows)  # any cache type: an index_select of the batch dimension
        return
    for layer in cache.layers:  # full-attention static layers (the caller checked)
        layer.keys = layer.keys[rows, :, cut:].contiguous()
        layer.values = layer.values[rows, :, cut:].contiguous()
        layer.max_cache_len -= cut
        layer.cumulative_length.sub_(cut)


def _full_attention_only(config) -> bool:
    """Whether every layer's decoding cache keeps all positions: the packed prefill writes whole prompts into it
    (a sliding-window layer keeps only the newest)."""
    from transformers import StaticCache

    return not any(layer.is_sliding for layer in StaticCache(config=config, max_cache_len=1).layers)


class _KeepReplies:
    """Puts each row's keys and values, its prompt and its reply, into the prefix cache as the row leaves the decode
    batch, in place of the prompt's own entry: an agent's next prompt repeats the reply, and now only the tokens after
    it are prefilled. Cache row r holds the row's prompt (but its last token) left-padded to `width` slots, then one
    slot per token fed while decoding (the prompt's last token, then each generated token but the newest)."""

    def __init__(self, prefix_cache: _PrefixCache, rows: list[list[int]], prompt_kv: list, width: int):
        self.prefix_cache, self.rows, self.prompt_kv, self.width = prefix_cache, rows, prompt_kv, width
        self.in_cache = list(range(len(rows)))  # the original row of each cache row
        self.shift = 0  # slots cut from the left so far

    def leaving(self, cache, out: list[list[int]], staying: set[int]) -> None:
        """Store the rows of the cache that are not `staying` (each row once: it then leaves the cache)."""
        for c, row in enumerate(self.in_cache):
            if row in staying or not out[row]:
                continue
            ids = self.rows[row] + out[row][:-1]  # the newest token was never fed
            start = self.width - (len(self.rows[row]) - 1) - self.shift
            layers = [(layer.keys[c : c + 1, :, start : start + len(ids)].clone(),
                       layer.values[c : c + 1, :, start : start + len(ids)].clone()) for layer in cache.layers]
            self.prefix_cache.replace(self.prompt_kv[row], ids, layers)

    def compacted(self, live: list[int], cut: int) -> None:
        self.in_cache, self.shift = list(live), self.shift + cut


def _is_prefix(short: list[int], ids: list[int]) -> bool:
    n = len(short)
    # the last token first: it rules out nearly every other prompt without copying a slice
    return n <= len(ids) and (n == 0 or short[-1] == ids[n - 1]) and ids[:n] == short


class _PrefixCache:
    """The KV caches of the last `capacity` prompts (and at most `max_bytes` of them), found again by their longest
    common token prefix."""

    def __init__(self, capacity: int, max_bytes: int | None = None):
        self.capacity, self.max_bytes = capacity, max_bytes
        self.entries: list[tuple[list[int], list]] = []  # (token ids, [(keys, values) per layer]), oldest first

    @staticmethod
    def entry_nbytes(layers: list) -> int:
        return sum(t.nbytes for kv in layers for t in kv)

    def nbytes(self) -> int:
        return sum(self.entry_nbytes(layers) for _, layers in self.entries)

    def trim(self) -> None:
        """Drop the oldest entries while the cache holds more than `max_bytes` (a prompt's entry is filled by the
        forward after `add`, so its size is known only then)."""
        if self.max_bytes is None:
            return
        sizes = [self.entry_nbytes(layers) for _, layers in self.entries]
        total, drop = sum(sizes), 0
        while total > self.max_bytes and drop < len(sizes):
            total, drop = total - sizes[drop], drop + 1
        del self.entries[:drop]

    def longest_prefix(self, ids: list[int]) -> tuple[int, list | None]:
        # the usual case, an episode's previous prompt, is a whole prefix: found by a C-speed list comparison
        best = next((i for i in range(len(self.entries) - 1, -1, -1) if _is_prefix(self.entries[i][0], ids)), None)
        best_len = len(self.entries[best][0]) if best is not None else 0
        if best is None:  # a new prompt (or a truncated one): the longest common prefix with any entry
            probe = ids[:1]
            for i, (cached, _) in enumerate(self.entries):
                # one slice comparison rules out an entry that cannot beat the best so far (most of them)
                if len(cached) > best_len and cached[: best_len + 1] == probe:
                    best, best_len = i, common_prefix_len(ids, cached)
                    probe = ids[: best_len + 1]
        if best is None:
            return 0, None
        cached, layers = self.entries.pop(best)
        if best_len < len(cached):  # a different continuation: keep that prompt's cache too
            self.entries.append((cached, layers))
        return best_len, layers

    def add(self, ids: list[int], layers: list) -> None:
        self.entries.append((ids, layers))
        del self.entries[: max(0, len(self.entries) - self.capacity)]

    def replace(self, old_layers: list, ids: list[int], layers: list) -> None:
        """Put (ids, layers) where the entry holding `old_layers` is (that prompt continued), or add it."""
        at = next((i for i in range(len(self.entries) - 1, -1, -1) if self.entries[i][1] is old_layers), None)
        if at is None:
            self.add(ids, layers)
        else:
            self.entries[at] = (ids, layers)
