"""The ReAct prompt for the agent's next turn, cut to fit the context window (the text format itself, and the parsing
of replies, is steptune.data.react). The rollout loop and the Monte-Carlo teacher's rollouts both prompt with it.

Prompts follow ETO: the first user turn holds the environment instruction (action list, format rules),
an optional worked example, then the task; after that the turns alternate between the agent's
`Thought: ...\nAction: ...` and the environment's `Observation: ...`.
"""

from __future__ import annotations

from collections.abc import Callable

from steptune.data.trajectory import Trajectory

# Steps are dropped in blocks so that the kept history starts at the same step for several turns in a row:
# each prompt then extends the previous one, and a backend's prefix KV cache (steptune.backends.local)
# prefills only the newest turn instead of the whole window.
TRUNCATION_BLOCK = 4


def approx_token_count(conversation: list[dict[str, str]]) -> int:
    """~4 characters per token: the fallback when the backend has no tokenizer to count with."""
    return sum(len(m["content"]) for m in conversation) // 4 + 4 * len(conversation)


def build_conversation(
    traj: Trajectory,
    example: str | None = None,
    max_context_tokens: int | None = None,
    count_tokens: Callable[[list[dict[str, str]]], int] = approx_token_count,
    dropped_before: int = 0,
) -> tuple[list[dict[str, str]], bool]:
    """The chat for the agent's next turn, and whether it had to be truncated.

    Too long for the window: keep the first user turn (instruction + example + task) and the most recent
    steps, dropping the oldest whole step pairs, `TRUNCATION_BLOCK` of them at a time, as few blocks as fit. The
    first kept turn after the head is always an assistant turn, so roles keep alternating as chat templates
    require. `dropped_before` is how many steps the trajectory's previous turn dropped: prompts only grow, so
    no fewer go now, and the search starts there (usually one token count instead of a dozen).
    """
    msgs = [{"role": m.role, "content": m.content} for m in traj.messages(include_final_observation=True)]
    if example:
        msgs[0]["content"] = traj.model_copy(update={"example": example}).head()
    if max_context_tokens is None or _token_upper_bound(msgs) <= max_context_tokens:
        return msgs, False  # cheap: no tokenizer call while the chat is surely short enough
    head, rest = msgs[:1], msgs[1:]
    if dropped_before == 0 and count_tokens(msgs) <= max_context_tokens:
        return msgs, False

    def kept(blocks: int) -> list[dict[str, str]]:
        return head + rest[2 * TRUNCATION_BLOCK * blocks :]  # drop the oldest (assistant, observation) pairs

    # the fewest blocks whose removal fits; token counts only shrink as blocks go, and dropping every step is the
    # answer when nothing fits
    lo, hi = max(1, dropped_before // TRUNCATION_BLOCK), -(-len(rest) // (2 * TRUNCATION_BLOCK))
    lo = min(lo, hi)
    if lo < hi and count_tokens(kept(lo)) <= max_context_tokens:
        return kept(lo), True
    lo += 1
    while lo < hi:
        mid = (lo + hi) // 2
        if count_tokens(kept(mid)) <= max_context_tokens:
            hi = mid
        else:
            lo = mid + 1
    return kept(hi), True


def _token_upper_bound(conversation: list[dict[str, str]]) -> int:
    """Byte-level tokenizers never make more tokens than UTF-8 bytes; 16 per message covers chat markup."""
    return sum(len(m["content"].encode()) + 16 for m in conversation)
