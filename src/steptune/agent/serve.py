"""A small OpenAI-compatible server over the local transformers backend (`steptune serve`).

Serves /v1/models and /v1/chat/completions (non-streaming, n=1). Requests are answered one at a time
(the model is not thread-safe); good enough to serve a local teacher or to test OpenAI clients against.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from steptune.agent.backends.base import DEFAULT_MAX_NEW_TOKENS, ChatBackend, GenerationConfig

log = logging.getLogger(__name__)


def make_server(backend: ChatBackend, model_name: str, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt: str, *args: object) -> None:  # route to logging (no auth headers are logged)
            log.info("%s %s", self.address_string(), fmt % args)

        def _send(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str) -> None:
            self._send(status, {"error": {"message": message, "type": "invalid_request_error", "code": status}})

        def do_GET(self) -> None:
            if self.path.rstrip("/") in ("/v1/models", "/models"):
                self._send(200, {"object": "list", "data": [
                    {"id": model_name, "object": "model", "created": 0, "owned_by": "steptune"}]})
            elif self.path.rstrip("/") in ("/health", ""):
                self._send(200, {"status": "ok"})
            else:
                self._error(404, f"no route {self.path}")

        def do_POST(self) -> None:
            if self.path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
                return self._error(404, f"no route {self.path}")
            try:
                req = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                messages, gen = _parse_request(req)
            except (ValueError, TypeError, KeyError) as e:
                return self._error(400, f"bad request: {e}")
            try:
                with lock:
                    text = backend.complete([messages], gen)[0]
            except Exception as e:  # a failed generation must answer 500, not drop the socket
                log.exception("generation failed")
                return self._send(500, {"error": {"message": f"generation failed: {type(e).__name__}",
                                                  "type": "server_error", "code": 500}})
            self._send(200, {
                "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            })

    return ThreadingHTTPServer((host, port), Handler)


def _parse_request(req: dict) -> tuple[list[dict[str, str]], GenerationConfig]:
    messages = req["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    clean = []
    for m in messages:
        if m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
            raise ValueError("each message needs a role (system/user/assistant) and string content")
        clean.append({"role": m["role"], "content": m["content"]})
    if req.get("n", 1) != 1:
        raise ValueError("only n=1 is supported")
    if req.get("stream"):
        raise ValueError("streaming is not supported")
    stop = req.get("stop") or []
    stop = [stop] if isinstance(stop, str) else list(stop)
    max_tokens = req.get("max_completion_tokens") or req.get("max_tokens") or DEFAULT_MAX_NEW_TOKENS
    gen = GenerationConfig(max_new_tokens=int(max_tokens), temperature=float(req.get("temperature") or 0.0),
                           top_p=float(req.get("top_p") or 1.0), stop=stop, seed=req.get("seed"))
    return clean, gen


def serve(model_path: str, host: str = "127.0.0.1", port: int = 8000, model_name: str | None = None) -> None:
    from steptune.agent.backends.local import LocalBackend

    backend = LocalBackend(model_path)
    server = make_server(backend, model_name or str(model_path), host, port)
    print(f"serving {model_path} on http://{host}:{server.server_address[1]}/v1", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
