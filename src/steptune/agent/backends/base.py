"""One interface for every way of running an LLM: a batch of conversations in, a batch of completions out.

The student policy, the evaluation loop and the LLM teacher all talk to models only through this.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

Conversation = list[dict[str, str]]  # [{"role": "user"|"assistant"|"system", "content": ...}, ...]


@dataclass
class GenerationConfig:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)  # cut the completion at the first of these (kept out of the text)
    seed: int | None = None


class ChatBackend(ABC):
    @abstractmethod
    def complete(self, conversations: list[Conversation], gen: GenerationConfig) -> list[str]:
        """One completion per conversation, in order. Failures that survive retries raise BackendError."""

    def close(self) -> None:  # noqa: B027
        pass


class BackendError(RuntimeError):
    """A model call failed for good (after retries); callers record it as a counted failure."""
