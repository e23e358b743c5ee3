"""Token-level partial masks: render a conversation with the tokenizer's own chat template and label only the
tokens of weight-1 assistant messages.

What is trained, precisely: for each assistant message with weight 1, the characters of the rendered text from
the first character of its content to the end of its end-of-turn marker (`<|im_end|>`, `</s>`, `<|eot_id|>`,
`<end_of_turn>`, …), so the model learns to stop. Role headers, user turns, weight-0 assistant turns and
whitespace the template adds after the end-of-turn marker are never trained. A token is trained when it overlaps
that character range, so a token that merges a template space with the content's first word (SentencePiece's
`▁Thought` after `[/INST]`) is trained whole — that is the token the model must produce there.

Spans are found by incremental prefix rendering: the rendering of messages[:k] (with the generation prompt) and
of messages[:k+1] must both be prefixes of the full rendering, which proves the pieces reproduce it exactly.
Text a template writes after the last message only (Phi-3 ends the conversation with EOS) belongs to no
message: it is found once, taken off each prefix rendering before the check, and never trained.
The full string is tokenized once (no special tokens added: the template owns BOS) and characters are mapped to
tokens through the offset mapping; only when a token would straddle the end of a turn (a template whose
end-of-turn marker is not a special token of this tokenizer) is it tokenized turn by turn instead.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import jinja2

from steptune.data.templates import TemplateError
from steptune.data.trajectory import Message, Trajectory

IGNORE_INDEX = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where not trained
    step_spans: list[tuple[int, int, int]] = field(default_factory=list)  # (start_tok, end_tok, message_index)
    n_dropped_steps: int = 0  # assistant steps cut by truncation (whole steps only)
    n_trained_steps: int = 0

    @property
    def n_trained_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)

    @property
    def trainable(self) -> bool:
        return self.n_trained_tokens > 0


def _render(tokenizer, conv: Sequence[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(list(conv), tokenize=False, add_generation_prompt=add_generation_prompt)


def _template_name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def _trailer(tokenizer, conv: list[dict], full: str) -> str:
    """Text the template writes after the last message when no generation prompt is asked for, belonging to no
    message (Phi-3 closes the conversation with EOS). Found on the first message alone: its rendering is a prefix
    of the whole one followed by a suffix that the whole rendering ends with too. The cut is put at a token
    boundary: character by character, `<|endoftext|>` and the next turn's `<|assistant|>` share a `<|`."""
    try:
        first = _render(tokenizer, conv[:1])
    except jinja2.TemplateError:  # a template that refuses a lone user turn; then no trailer can be told apart
        return ""
    if full.startswith(first):
        return ""
    offsets = tokenizer(first, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    boundaries = {a for a, _ in offsets}
    for cut in range(len(os.path.commonprefix([first, full])), -1, -1):  # the shortest trailer that fits
        if cut in boundaries and full.endswith(first[cut:]) and len(first) - cut < len(full):
            return first[cut:]
    return ""


def assistant_char_spans(messages: Sequence[Message], tokenizer) -> tuple[str, list[tuple[int, int, int]]]:
    """The full rendering and, for each assistant message, (char_start, char_end, message_index) of the text
    to train: content start to the end of the end-of-turn marker."""
    conv = [{"role": m.role, "content": m.content} for m in messages]
    full = _render(tokenizer, conv)
    trailer = _trailer(tokenizer, conv, full) if len(conv) > 1 else ""
    spans = []
    for k, msg in enumerate(messages):
        if msg.role != "assistant":
            continue
        before = _render(tokenizer, conv[:k], add_generation_prompt=True) if k else ""
        upto = _render(tokenizer, conv[: k + 1])
        if trailer and upto.endswith(trailer):
            upto = upto[: len(upto) - len(trailer)]  # the closing text is no part of this message
        if not full.startswith(before) or not full.startswith(upto) or not upto.startswith(before):
            raise TemplateError(
                f"chat template of {_template_name(tokenizer)!r} does not render message {k} as a prefix of the whole "
                "conversation, so its trained span cannot be located exactly (is it a template that rewrites "
                "earlier turns, e.g. drops past reasoning?). Override it with --chat-template.")
        segment = upto[len(before):]
        text = msg.content.strip()
        start = segment.find(text) if text else len(segment.rstrip())
        if start < 0:
            raise TemplateError(f"message {k}'s content does not appear verbatim in its rendering by the chat template "
                                f"of {_template_name(tokenizer)!r}")
        end = len(segment.rstrip())  # through the end-of-turn marker, not the whitespace after it
        spans.append((len(before) + start, len(before) + end, k))
    return full, spans


def _tokenize(tokenizer, text: str, ends: list[int]) -> tuple[list[int], list[tuple[int, int]]]:
    """Tokenize once; if a token straddles the end of an assistant turn (the template's end-of-turn marker is
    not a special token of this tokenizer, e.g. a Llama-3 template on a ChatML tokenizer), tokenize the pieces
    between turn ends separately instead, so no token is half trained."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    if not any(a < end < b for end in ends for a, b in offsets):
        return enc["input_ids"], offsets
    ids, offs, start = [], [], 0
    for end in [*ends, len(text)]:
        if end <= start:
            continue
        piece = tokenizer(text[start:end], add_special_tokens=False, return_offsets_mapping=True)
        ids += piece["input_ids"]
        offs += [(a + start, b + start) for a, b in piece["offset_mapping"]]
        start = end
    if tokenizer.decode(ids) != tokenizer.decode(enc["input_ids"]):
        raise TemplateError("tokenizing the conversation turn by turn does not reproduce its text")
    return ids, offs


def encode_messages(messages: Sequence[Message], tokenizer, max_length: int | None = None) -> Encoded:
    full, char_spans = assistant_char_spans(messages, tokenizer)
    ids, offsets = _tokenize(tokenizer, full, [c1 for _, c1, _ in char_spans])
    bos = tokenizer.bos_token_id
    if bos is not None and len(ids) > 1 and ids[0] == bos and ids[1] == bos:
        raise TemplateError("the rendering starts with two BOS tokens")

    labels = [IGNORE_INDEX] * len(ids)
    step_spans: list[tuple[int, int, int]] = []
    tok = 0
    for c0, c1, k in char_spans:
        while tok < len(ids) and offsets[tok][1] <= c0:
            tok += 1
        first = tok
        while tok < len(ids) and offsets[tok][0] < c1:
            tok += 1
        step_spans.append((first, tok, k))
        if messages[k].weight:
            labels[first:tok] = ids[first:tok]

    n_trained = sum(1 for _, _, k in step_spans if messages[k].weight)
    encoded = Encoded(ids, labels, step_spans, 0, n_trained)
    return truncate(encoded, messages, max_length) if max_length else encoded


def truncate(encoded: Encoded, messages: Sequence[Message], max_length: int) -> Encoded:
    """Cut to `max_length` tokens at a step boundary: a step is kept whole or dropped whole, never half-trained."""
    if len(encoded.input_ids) <= max_length:
        return encoded
    kept = [span for span in encoded.step_spans if span[1] <= max_length]
    cut = kept[-1][1] if kept else 0
    dropped = len(encoded.step_spans) - len(kept)
    n_trained = sum(1 for _, _, k in kept if messages[k].weight)
    return Encoded(encoded.input_ids[:cut], encoded.labels[:cut], kept, dropped, n_trained)


def encode_trajectory(traj: Trajectory, tokenizer, max_length: int | None = None) -> Encoded:
    return encode_messages(traj.messages(), tokenizer, max_length)
