"""An OpenAI-compatible chat server, run as its own process, that plays a ReAct student (model "student") and a JSON
teacher (model "teacher") for one-room TextWorldExpress coin games, checks each model's API key, and injects the
faults of a script into the teacher's requests.

    python _keyed_server.py LOG_PATH SCRIPT_JSON

Keys: the Authorization header must be "Bearer <key>" with the key read from this process's STUDENT_KEY /
TEACHER_KEY variables (the test sets them to the secrets it also puts in the variables the configs name);
anything else gets 401. The student looks around first, then takes the coin. The teacher calls every action but
`take coin` a mistake whose correction is `take coin`. SCRIPT_JSON lists faults for the teacher's successive HTTP
attempts ("ok", "429" = 429 with Retry-After: 1, "503" = 503 with Retry-After: 1, "500", "prose" = a reply that is
no JSON, "hang" = an answer after 1.5 s). One line per attempt goes to LOG_PATH: time, model, fault, status.
Prints "listening on http://127.0.0.1:PORT/v1" when ready.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from _http import send  # this script's folder is on sys.path

LOG_PATH, SCRIPT = sys.argv[1], json.loads(sys.argv[2])
KEYS = {"student": os.environ["STUDENT_KEY"], "teacher": os.environ["TEACHER_KEY"]}
lock = threading.Lock()


def student_reply(messages: list[dict]) -> str:
    turns = sum(m["role"] == "assistant" for m in messages)
    if turns == 0:
        return "Thought: First I look around to see what is here.\nAction: look around"
    return "Thought: The coin is here, so I take it.\nAction: take coin"


def teacher_reply(messages: list[dict]) -> str:
    prompt = messages[1]["content"]
    judged = prompt.split("The step to judge:")[-1]
    action = re.search(r"Action: (.*)", judged)[1].strip()
    if action == "take coin":
        return '{"is_error": false}'
    return json.dumps({"is_error": True, "error": f"'{action}' wastes a move", "reason": "the coin is in sight",
                       "reflection": "I did not need to look around; the coin is right here.",
                       "corrected_thought": "I take the coin.", "corrected_action": "take coin"})


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        model = body.get("model")
        fault = "ok"
        if model not in KEYS or self.headers.get("Authorization") != f"Bearer {KEYS[model]}":
            fault = "auth"
        elif model == "teacher":
            with lock:
                fault = SCRIPT.pop(0) if SCRIPT else "ok"
        with lock, open(LOG_PATH, "a") as fh:
            fh.write(json.dumps({"t": time.time(), "model": model, "fault": fault}) + "\n")
        if fault == "auth":
            return self._reply(401, {"error": {"message": "invalid api key", "type": "invalid_request_error"}})
        if fault in ("429", "503"):
            return self._reply(int(fault), {"error": {"message": "busy"}}, {"Retry-After": "1"})
        if fault == "500":
            return self._reply(500, {"error": {"message": "injected"}})
        if fault == "hang":
            time.sleep(1.5)
        content = student_reply(body["messages"]) if model == "student" else teacher_reply(body["messages"])
        if fault == "prose":
            content = "I think the student did fine, mostly."
        self._reply(200, {"id": "x", "object": "chat.completion", "created": 0, "model": model, "choices": [
            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}]})

    def _reply(self, status: int, payload: dict, headers: dict | None = None) -> None:
        send(self, status, json.dumps(payload).encode(), headers)


if __name__ == "__main__":
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(f"listening on http://127.0.0.1:{httpd.server_address[1]}/v1", flush=True)
    httpd.serve_forever()
