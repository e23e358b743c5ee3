"""The OpenAI-compatible client against the real `steptune serve` process, and against a socket server
that misbehaves on purpose (500, 429, garbage JSON, hangs)."""

import json
import logging
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from _http import send
from _react_model import react_model_fixture, varied_prompts

from steptune.backends import make_backend
from steptune.backends.base import BackendError, GenerationConfig
from steptune.backends.local import LocalBackend
from steptune.backends.openai_compat import OpenAICompatBackend
from steptune.data.react import REACT_STOP


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return react_model_fixture(tmp_path_factory)


@pytest.fixture(scope="module")
def server(model_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", "from steptune.cli import main; main()", "serve", "--model", str(model_dir), "--port", "0",
                             "--served-name", "tiny"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=env)
    try:
        line = proc.stdout.readline()  # "serving ... on http://127.0.0.1:PORT/v1"
        assert "serving" in line, f"server did not start: {line!r}"
        yield line.split(" on ")[1].strip()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_models_endpoint_lists_served_model(server):
    import openai

    client = openai.OpenAI(base_url=server, api_key="x")
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_client_against_real_server_matches_local_backend(server, model_dir):
    prompts = varied_prompts()
    gen = GenerationConfig(max_new_tokens=40, stop=REACT_STOP)
    remote = make_backend(f"openai:tiny@{server}")
    try:
        got = remote.complete(prompts, gen)
    finally:
        remote.close()
    assert got == LocalBackend(model_dir).complete(prompts, gen)
    assert got[0].endswith("Action: take coin") and got[2].endswith("Action: take coin")


def test_server_rejects_bad_request_with_400_not_retried(server):
    remote = OpenAICompatBackend(server, "tiny", max_retries=3, backoff_s=0.01)
    with pytest.raises(BackendError, match="not retried"):
        remote.complete([[{"role": "robot", "content": "x"}]], GenerationConfig(max_new_tokens=4))
    assert remote.retries == 0


class FaultyServer:
    """Answers chat completions following a script of faults, then correctly; records what it saw."""

    def __init__(self, script):
        self.script = list(script)
        self.requests = []
        self.times = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(({"Authorization": self.headers.get("Authorization")}, body))
                outer.times.append(time.monotonic())
                fault = outer.script.pop(0) if outer.script else "ok"
                if fault == "hang":
                    threading.Event().wait(1.5)  # longer than the client timeout
                    fault = "ok"
                if fault in ("429 wait 1", "503 wait 1"):
                    return self._reply(int(fault[:3]), b'{"error": {"message": "busy"}}', {"Retry-After": "1"})
                if fault in (500, 429, 503, 401, 400):
                    return self._reply(fault, b'{"error": {"message": "injected"}}')
                if fault == "garbage":
                    return self._reply(200, b"{not json")
                if fault == "empty":
                    return self._reply(200, b'{"choices": []}')
                reply = {"id": "x", "object": "chat.completion", "created": 0, "model": "m", "choices": [
                    {"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": "echo: " + body["messages"][-1]["content"]}}]}
                self._reply(200, json.dumps(reply).encode())

            def _reply(self, status, data, headers=None):
                send(self, status, data, headers)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def conv(text):
    return [{"role": "user", "content": text}]


def test_retries_through_injected_faults_and_sends_key_from_env(monkeypatch, caplog):
    monkeypatch.setenv("STEPTUNE_TEST_KEY", "sk-secret-123")
    with FaultyServer([500, 429, "garbage", "empty", "hang"]) as srv, caplog.at_level(logging.DEBUG):
        remote = OpenAICompatBackend(srv.url, "m", api_key_env="STEPTUNE_TEST_KEY", timeout_s=0.5, max_retries=6,
                                     backoff_s=0.01)
        assert remote.complete([conv("hello")], GenerationConfig(max_new_tokens=5)) == ["echo: hello"]
    assert remote.retries == 5 and len(srv.requests) == 6
    assert all(h["Authorization"] == "Bearer sk-secret-123" for h, _ in srv.requests)
    assert "sk-secret-123" not in caplog.text and "attempt" in caplog.text


@pytest.mark.parametrize("fault", ["429 wait 1", "503 wait 1"])
def test_retry_after_is_honoured(fault):
    with FaultyServer([fault]) as srv:
        remote = OpenAICompatBackend(srv.url, "m", max_retries=2, backoff_s=0.01)
        assert remote.complete([conv("hi")], GenerationConfig(max_new_tokens=5)) == ["echo: hi"]
    assert len(srv.requests) == 2 and srv.times[1] - srv.times[0] >= 0.95 and remote.retries == 1


def test_persistent_failure_raises_backend_error():
    with FaultyServer([503] * 10) as srv:
        remote = OpenAICompatBackend(srv.url, "m", max_retries=2, backoff_s=0.01)
        with pytest.raises(BackendError, match="after 3 attempts"):
            remote.complete([conv("x")], GenerationConfig(max_new_tokens=5))
    assert len(srv.requests) == 3


def test_auth_error_is_not_retried():
    with FaultyServer([401]) as srv:
        remote = OpenAICompatBackend(srv.url, "m", max_retries=3, backoff_s=0.01)
        with pytest.raises(BackendError, match="HTTP 401"):
            remote.complete([conv("x")], GenerationConfig(max_new_tokens=5))
    assert len(srv.requests) == 1


def test_concurrent_batch_keeps_order_and_cuts_stops():
    with FaultyServer([]) as srv:
        remote = OpenAICompatBackend(srv.url, "m", max_concurrency=4)
        texts = [f"turn {i}\nObservation: leaked" for i in range(12)]
        out = remote.complete([conv(t) for t in texts], GenerationConfig(max_new_tokens=5, stop=REACT_STOP))
    assert out == [f"echo: turn {i}" for i in range(12)]
    assert srv.requests[0][1]["stop"] == REACT_STOP and srv.requests[0][1]["max_tokens"] == 5


def test_one_failed_conversation_keeps_the_others_completions():
    with FaultyServer(["ok", 400]) as srv:  # one request at a time, so the second conversation is refused
        remote = OpenAICompatBackend(srv.url, "m", max_concurrency=1, max_retries=3, backoff_s=0.01)
        with pytest.raises(BackendError, match="HTTP 400") as err:
            remote.complete([conv("a"), conv("b"), conv("c")], GenerationConfig(max_new_tokens=5))
    replies, errors = err.value.per_conversation(3)
    assert replies == ["echo: a", None, "echo: c"] and list(errors) == [1] and "not retried" in errors[1]
    assert len(srv.requests) == 3


def test_rollout_fails_only_the_episode_whose_request_failed():
    from _twx_pool import twx_pool

    from steptune.agent.rollout import run_episodes

    pool = twx_pool(2)
    try:
        with FaultyServer([400]) as srv:  # the first request of the first round: episode 0's first turn
            remote = OpenAICompatBackend(srv.url, "m", max_concurrency=1, backoff_s=0.01)
            recorded = []
            eps = run_episodes(pool, pool.tasks("seen")[:2], remote, GenerationConfig(max_new_tokens=5),
                               progress=False, on_episode_end=recorded.append)
    finally:
        pool.close()
    assert len(recorded) == 2
    assert eps[0].failure.startswith("backend: ") and "HTTP 400" in eps[0].failure and eps[0].steps_taken == 0
    assert eps[1].failure is None and eps[1].steps_taken == 6  # echoes are invalid actions until the step limit


def test_rollout_through_real_server_and_backend_failures_are_recorded(server):
    from _twx_pool import twx_pool

    from steptune.agent.rollout import run_episodes

    pool = twx_pool(2)
    try:
        tasks = pool.tasks("seen")[:2]
        remote = make_backend(f"openai:tiny@{server}")
        eps = run_episodes(pool, tasks, remote, GenerationConfig(max_new_tokens=40), progress=False)
        assert all(e.success and e.failure is None for e in eps)
        with FaultyServer([500] * 100) as srv:
            broken = OpenAICompatBackend(srv.url, "m", max_retries=1, backoff_s=0.01)
            recorded = []
            eps = run_episodes(pool, tasks, broken, GenerationConfig(max_new_tokens=5), progress=False,
                               on_episode_end=recorded.append)
        assert len(recorded) == 2 and all(e.failure.startswith("backend: ") and e.steps_taken == 0 for e in eps)
    finally:
        pool.close()


def test_server_answers_500_when_generation_fails_and_stays_up(server):
    import urllib.error
    import urllib.request

    req = urllib.request.Request(f"{server}/chat/completions", method="POST", headers={"Content-Type": "application/json"},
                                 data=json.dumps({"model": "tiny", "messages": conv("x"), "max_tokens": -3}).encode())
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=30)
    assert err.value.code == 500 and "generation failed" in err.value.read().decode()
    remote = OpenAICompatBackend(server, "tiny")
    assert len(remote.complete([conv("still there?")], GenerationConfig(max_new_tokens=3))) == 1
