"""One interface for every way of running an LLM: a batch of conversations in, a batch of completions out.

The student policy, the evaluation loop and the LLM teacher all talk to models only through this.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

Conversation = list[dict[str, str]]  # [{"role": "user"|"assistant"|"system", "content": ...}, ...]

# the one default length of a student's turn (thought + action), for every stage, config and command that generates
DEFAULT_MAX_NEW_TOKENS = 256


@dataclass
class GenerationConfig:
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)  # cut the completion at the first of these (kept out of the text)
    seed: int | None = None
    # sampling: one seed per conversation (the rollout derives them from episode and step), so what a conversation
    # samples does not depend on the batch it is in; None: one generator for the batch, seeded with `seed`
    row_seeds: list[int] | None = None


class ChatBackend(ABC):
    @abstractmethod
    def complete(self, conversations: list[Conversation], gen: GenerationConfig) -> list[str]:
        """One completion per conversation, in order. Failures that survive retries raise BackendError (which may
        carry the completions of the conversations that did not fail)."""

    def close(self) -> None:  # noqa: B027
        pass


class BackendError(RuntimeError):
    """A model call failed for good (after retries); callers record it as a counted failure.

    A backend that sends a batch's conversations separately fails only those that failed: `replies` then holds the
    others' completions (None where `errors` says why), so one bad request does not cost a whole batch."""

    def __init__(self, message: str, replies: list[str | None] | None = None, errors: dict[int, str] | None = None):
        super().__init__(message)
        self.replies, self.errors = replies, errors or {}

    def per_conversation(self, n: int) -> tuple[list[str | None], dict[int, str]]:
        """(completions, reasons by index) for a batch of `n`: None and a reason for each failed conversation."""
        if self.replies is not None:
            return self.replies, self.errors
        return [None] * n, dict.fromkeys(range(n), str(self))
