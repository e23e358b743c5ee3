"""Token ids of an agent's chat prompts, reusing the previous turn's ids.

An agent's prompt at turn t is its prompt at turn t-1 plus one reply and one observation, yet tokenizing the
whole rendered chat again costs ~0.7 ms per 1k tokens on a CPU core, every turn, for every episode. Tokenizers
split the text at special tokens before anything else and treat the pieces independently, so the ids up to a
special token that the previous prompt shares with the new one are still right; only the text after it is
tokenized again, prefixed with that special token so it is seen exactly as in the full text (not as the start
of a string, which some normalizers treat differently). The first few reuses are checked against a full
tokenization; a tokenizer that disagrees (an exotic normalizer) turns reuse off for good.
"""

from __future__ import annotations

import bisect
import logging
import re
from collections import OrderedDict
from dataclasses import dataclass

log = logging.getLogger(__name__)

Conversation = list[dict[str, str]]


@dataclass
class _Encoded:
    text: str
    ids: list[int]
    cut_chars: list[int]  # text offsets just after each special token...
    cut_tokens: list[int]  # ...and the matching id offsets
    cut_specials: list[str]


class PromptEncoder:
    def __init__(self, tokenizer, capacity: int, checks: int = 8):
        self.tokenizer = tokenizer
        self.capacity = capacity
        self.checks_left = checks
        self._memo: OrderedDict[tuple, _Encoded] = OrderedDict()
        self.reused_tokens = 0  # ids taken from an earlier prompt instead of tokenized again
        # Special tokens that eat neighbouring whitespace or get normalized make the split position ambiguous.
        specials = {t.content: i for i, t in tokenizer.added_tokens_decoder.items()
                    if t.special and not (t.lstrip or t.rstrip or t.single_word or t.normalized)}
        self._special_ids = set(specials.values())
        self._special_re = re.compile("|".join(map(re.escape, sorted(specials, key=len, reverse=True)))) \
            if specials else None
        self.enabled = self._special_re is not None

    def render(self, conversation: Conversation) -> str:
        return self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)

    def encode(self, conversation: Conversation) -> list[int]:
        key = _key(conversation)
        hit = self._memo.get(key)
        if hit is not None:
            return hit.ids
        text = self.render(conversation)
        # the episode's previous prompt: one step back, or two when a reflection step followed a wrong one
        previous = next((self._memo[k] for back in (2, 4) if self.enabled and len(key) > back
                         and (k := key[:-back]) in self._memo), None)
        enc = self._extend(previous, text) if previous is not None else None
        if enc is not None and self.checks_left > 0:
            self.checks_left -= 1
            full = self._tokenize(text)
            if full != enc.ids:
                log.warning("prompt token reuse disagrees with full tokenization for this tokenizer; turned off")
                self.enabled, enc = False, None
        if enc is None:
            enc = self._encode_full(text)
        self._memo[key] = enc
        while len(self._memo) > self.capacity:
            self._memo.popitem(last=False)
        return enc.ids

    def _tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _encode_full(self, text: str) -> _Encoded:
        ids = self._tokenize(text)
        chars, specials = [], []
        if self._special_re is not None:
            for m in self._special_re.finditer(text):
                chars.append(m.end())
                specials.append(m.group())
        tokens = [i + 1 for i, t in enumerate(ids) if t in self._special_ids]
        if len(tokens) != len(chars):  # a special token's text that was not split off: no safe cuts
            chars, tokens, specials = [], [], []
        return _Encoded(text, ids, chars, tokens, specials)

    def _extend(self, previous: _Encoded, text: str) -> _Encoded | None:
        shared = len(previous.text) if text.startswith(previous.text) else common_prefix_len(text, previous.text)
        k = bisect.bisect_right(previous.cut_chars, shared) - 1  # the last special token both texts contain
        if k < 0:
            return None
        anchor, char, token = previous.cut_specials[k], previous.cut_chars[k], previous.cut_tokens[k]
        tail = self._encode_full(anchor + text[char:])
        if not tail.cut_tokens or tail.cut_tokens[0] != 1:  # the anchor must come back as its own single id
            return None
        self.reused_tokens += token
        shift_chars, shift_tokens = char - len(anchor), token - 1
        return _Encoded(text, previous.ids[:token] + tail.ids[1:],
                        previous.cut_chars[:k] + [c + shift_chars for c in tail.cut_chars],
                        previous.cut_tokens[:k] + [t + shift_tokens for t in tail.cut_tokens],
                        previous.cut_specials[:k] + tail.cut_specials)


def _key(conversation: Conversation) -> tuple:
    return tuple((m["role"], m["content"]) for m in conversation)


def common_prefix_len(a, b) -> int:
    """Length of the common prefix of two strings or lists."""
    lo, hi = 0, min(len(a), len(b))  # bisection over C-speed slice comparisons
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo
