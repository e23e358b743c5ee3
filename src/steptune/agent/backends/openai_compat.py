"""Any OpenAI-compatible chat-completions server (vLLM serve, SGLang, TGI, llama.cpp, `steptune serve`, OpenAI).

Conversations of a batch are sent concurrently (bounded thread pool). Rate limits, 5xx, timeouts, dropped
connections and unparsable replies are retried with exponential backoff; a request that still fails raises
BackendError, which carries the completions of the batch's other conversations. The API key is read from an
environment variable and never logged.
"""

from __future__ import annotations

import logging
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor

from steptune.agent.backends.base import (
    BackendError,
    ChatBackend,
    Conversation,
    GenerationConfig,
)
from steptune.agent.backends.local import cut_at_stop

log = logging.getLogger(__name__)


class OpenAICompatBackend(ChatBackend):
    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", max_concurrency: int = 8,
                 timeout_s: float = 60.0, max_retries: int = 4, backoff_s: float = 0.5, max_backoff_s: float = 20.0):
        import openai

        # The client's own retries are off: ours also cover garbage bodies, and count attempts in one place.
        self.client = openai.OpenAI(base_url=base_url, api_key=os.environ.get(api_key_env) or "EMPTY",
                                    timeout=timeout_s, max_retries=0)
        self.model = model
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="openai-compat")
        self.retries = 0  # total retried attempts, for reports

    def complete(self, conversations: list[Conversation], gen: GenerationConfig) -> list[str]:
        seeds = gen.row_seeds or [gen.seed] * len(conversations)
        futures = [self.pool.submit(self._complete_one, c, gen, seed) for c, seed in zip(conversations, seeds)]
        replies: list[str | None] = []
        failed: dict[int, BackendError] = {}
        for i, future in enumerate(futures):
            try:
                replies.append(future.result())
            except BackendError as e:  # the others' completions are kept (e.g. one prompt too long for the server)
                replies.append(None)
                failed[i] = e
        if failed:
            first = next(iter(failed.values()))
            more = f" (and {len(failed) - 1} more of {len(replies)} conversations)" if len(failed) > 1 else ""
            raise BackendError(f"{first}{more}", replies, {i: str(e) for i, e in failed.items()}) from first
        return replies

    def _complete_one(self, conversation: Conversation, gen: GenerationConfig, seed: int | None) -> str:
        import openai

        last: Exception | None = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                self.retries += 1
                delay = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))
                time.sleep(delay * (0.5 + random.random() / 2))  # jitter spreads out a herd of retries
            try:
                resp = self.client.chat.completions.create(
                    model=self.model, messages=conversation, max_tokens=gen.max_new_tokens,
                    temperature=gen.temperature, top_p=gen.top_p, stop=gen.stop[:4] or None, seed=seed,
                )
                text = resp.choices[0].message.content
                if not isinstance(text, str):
                    raise TypeError("reply has no message content")
                # Servers may ignore stops beyond their limit or include the stop text; cut again locally.
                return cut_at_stop(text, gen.stop)
            except (openai.RateLimitError, openai.InternalServerError, openai.APIConnectionError) as e:
                last = e  # APIConnectionError covers timeouts too
            except openai.APIStatusError as e:
                if e.status_code not in (408, 409) and e.status_code < 500:
                    raise BackendError(f"{type(e).__name__} (HTTP {e.status_code}); not retried") from e
                last = e
            except (ValueError, TypeError, AttributeError, IndexError, openai.APIResponseValidationError) as e:
                last = e  # garbage body: JSON that does not parse or lacks choices
            log.warning("chat completion attempt %d failed: %s", attempt + 1, type(last).__name__)
        raise BackendError(f"chat completion failed after {self.max_retries + 1} attempts: "
                           f"{type(last).__name__}: {last}") from last

    def close(self) -> None:
        self.pool.shutdown(wait=False)
        self.client.close()
