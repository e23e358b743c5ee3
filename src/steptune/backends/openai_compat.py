"""Any OpenAI-compatible chat-completions server (vLLM serve, SGLang, TGI, llama.cpp, `steptune serve`, OpenAI).

Conversations of a batch are sent concurrently (bounded thread pool). HTTP-level failures — rate limits (429),
408/409, 5xx, timeouts, dropped connections — are retried by the `openai` client itself (`max_retries`), which
waits as long as the server's Retry-After / retry-after-ms says (up to 2 minutes; a longer one is not retried),
else backs off exponentially. A 200 whose body is no usable completion is retried here, up to `max_retries`
times too. A request that still fails raises BackendError, which carries the completions of the batch's other
conversations. The API key is read from an environment variable and never logged.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from steptune.backends.base import (
    BackendError,
    ChatBackend,
    Conversation,
    GenerationConfig,
)
from steptune.backends.local import cut_at_stop

log = logging.getLogger(__name__)


class OpenAICompatBackend(ChatBackend):
    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", max_concurrency: int = 8,
                 timeout_s: float = 60.0, max_retries: int = 4, backoff_s: float = 0.5, max_backoff_s: float = 20.0):
        import openai

        self._lock = threading.Lock()
        self.retries = 0  # total retried attempts (HTTP-level and bad bodies), for reports
        # every attempt the client makes passes the request hook: retries are counted where they happen
        http_client = openai.DefaultHttpxClient(event_hooks={"request": [self._on_request],
                                                             "response": [self._on_response]})
        self.client = openai.OpenAI(base_url=base_url, api_key=os.environ.get(api_key_env) or "EMPTY",
                                    timeout=timeout_s, max_retries=max_retries, http_client=http_client)
        self.model = model
        self.max_retries = max_retries
        self.backoff_s = backoff_s  # between retries of unusable bodies (HTTP retries use the client's backoff)
        self.max_backoff_s = max_backoff_s
        self.pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="openai-compat")

    def _on_request(self, request) -> None:
        retry = _attempts(request) - 1
        if retry:
            with self._lock:
                self.retries += 1
            log.warning("chat completion attempt %d (retry %d of %d)", retry + 1, retry, self.max_retries)

    def _on_response(self, response) -> None:
        if response.status_code >= 400:
            wait = response.headers.get("retry-after-ms") or response.headers.get("retry-after")
            log.warning("chat completion attempt got HTTP %d%s", response.status_code,
                        f" (Retry-After {wait})" if wait else "")

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
                with self._lock:
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
            except openai.APIStatusError as e:  # the client has retried what was worth retrying
                n = _attempts(e.response.request)
                raise BackendError(f"{type(e).__name__} (HTTP {e.status_code})"
                                   f"{'; not retried' if n == 1 else f' after {n} attempts'}") from e
            except openai.APIConnectionError as e:  # APITimeoutError included; retried by the client too
                raise BackendError(f"{type(e).__name__} after {_attempts(e.request)} attempts") from e
            except (ValueError, TypeError, AttributeError, IndexError, openai.APIResponseValidationError) as e:
                last = e  # garbage body: JSON that does not parse or lacks choices
            log.warning("chat completion attempt %d returned no usable completion: %s", attempt + 1,
                        type(last).__name__)
        raise BackendError(f"chat completion failed after {self.max_retries + 1} attempts: "
                           f"{type(last).__name__}: {last}") from last

    def close(self) -> None:
        self.pool.shutdown(wait=False)
        self.client.close()


def _attempts(request) -> int:
    """How many attempts the client made, read from the retry count it sends with each one."""
    try:
        return int(request.headers.get("x-stainless-retry-count") or 0) + 1
    except (AttributeError, RuntimeError, ValueError):
        return 1
