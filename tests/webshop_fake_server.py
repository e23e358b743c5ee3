"""A tiny three-product shop speaking AgentGym's agentenv-webshop HTTP API (test data for test_env_webshop.py).

Same routes and JSON shapes as the real server: POST /create → int, POST /reset {env_idx, session_id} →
[observation, null], POST /step {env_idx, action} → {state, reward, done, info}, GET /observation,
/instruction_text, /available_actions?env_idx=..., POST /close {env_idx} → {closed}. Pages use WebShop's text
observation style ("... [SEP] ..."). Run: python webshop_fake_server.py [--mode ok|fail500|slow]; it prints the
port it listens on (127.0.0.1, port chosen by the OS) as its first line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

PRODUCTS = {
    "b0001": {"title": "Ceramic Coffee Mug 12oz", "price": 12.99, "options": ["red", "blue"]},
    "b0002": {"title": "Cotton T-Shirt Crew Neck", "price": 15.50, "options": ["blue", "green"]},
    "b0003": {"title": "Stainless Steel Water Bottle", "price": 24.00, "options": ["silver"]},
}
GOALS = [  # session_id → (instruction, product, option)
    ("i need a ceramic coffee mug in red, and price lower than 20.00 dollars", "b0001", "red"),
    ("find me a cotton t-shirt in green, and price lower than 30.00 dollars", "b0002", "green"),
    ("i want a stainless steel water bottle, and price lower than 30.00 dollars", "b0003", "silver"),
]


class Session:
    def __init__(self) -> None:
        self.reset(0)

    def reset(self, session_id: int) -> None:
        self.goal = GOALS[session_id % len(GOALS)]
        self.page, self.item, self.option = "search", None, None

    def instruction(self) -> str:
        return f"Instruction: [SEP] {self.goal[0]}"

    def clickables(self) -> list[str]:
        if self.page == "search":
            return ["search"]
        if self.page == "results":
            return ["back to search", "next >", *PRODUCTS]
        if self.page == "item":
            return ["back to search", "< prev", "description", "buy now", *PRODUCTS[self.item]["options"]]
        return []

    def observation(self) -> str:
        if self.page == "search":
            return f"WebShop [SEP] {self.instruction()} [SEP] Search"
        if self.page == "results":
            rows = " [SEP] ".join(f"{pid} [SEP] {p['title']} [SEP] ${p['price']}" for pid, p in PRODUCTS.items())
            header = f"{self.instruction()} [SEP] Back to Search [SEP] Page 1 (Total results: 3) [SEP] Next >"
            return f"{header} [SEP] {rows}"
        if self.page == "item":
            p = PRODUCTS[self.item]
            opts = " [SEP] ".join(p["options"])
            return (
                f"{self.instruction()} [SEP] Back to Search [SEP] < Prev [SEP] color [SEP] {opts} [SEP] "
                f"{p['title']} [SEP] Price: ${p['price']} [SEP] Rating: N.A. [SEP] Description [SEP] Buy Now"
            )
        return f"Thank you for shopping with us! [SEP] Your score (min 0.0, max 1.0) [SEP] {self.score()}"

    def score(self) -> float:
        _, want_item, want_option = self.goal
        if self.item != want_item:
            return 0.0
        return 1.0 if self.option == want_option else 0.5

    def step(self, action: str) -> tuple[str, float, bool]:
        action = action.strip().lower()
        if action.startswith("search[") and self.page == "search":
            self.page = "results"
        elif action.startswith("click[") and action.endswith("]"):
            value = action[6:-1]
            if value not in self.clickables():
                pass  # like WebShop: an invalid click leaves the page unchanged
            elif value == "back to search":
                self.page, self.item, self.option = "search", None, None
            elif value in PRODUCTS:
                self.page, self.item, self.option = "item", value, None
            elif value == "buy now":
                self.page = "done"
                return self.observation(), self.score(), True
            elif self.page == "item" and value in PRODUCTS[self.item]["options"]:
                self.option = value
        return self.observation(), 0.0, False


def make_handler(mode: str):
    sessions: dict[int, Session] = {}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep test output quiet
            pass

        def _reply(self, status: int, payload) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _session(self, env_idx) -> Session | None:
            session = sessions.get(int(env_idx))
            if session is None:
                self._reply(404, {"detail": f"no env {env_idx}"})
            return session

        def do_GET(self):
            url = urlparse(self.path)
            query = parse_qs(url.query)
            if url.path == "/":
                return self._reply(200, "ok")
            session = self._session(query.get("env_idx", ["-1"])[0])
            if session is None:
                return
            if url.path == "/observation":
                return self._reply(200, session.observation())
            if url.path == "/instruction_text":
                return self._reply(200, session.instruction())
            if url.path == "/available_actions":
                return self._reply(
                    200, {"has_search_bar": session.page == "search", "clickables": session.clickables()}
                )
            self._reply(404, {"detail": "Not Found"})

        def do_POST(self):
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
            if self.path == "/create":
                env_idx = len(sessions) + 100
                sessions[env_idx] = Session()
                return self._reply(200, env_idx)
            session = self._session(body.get("env_idx", -1))
            if session is None:
                return
            if self.path == "/reset":
                session.reset(int(body.get("session_id") or 0))
                return self._reply(200, [session.observation(), None])
            if self.path == "/step":
                if mode == "fail500":
                    return self._reply(500, {"detail": "Internal Server Error"})
                if mode == "slow":
                    time.sleep(30)
                state, reward, done = session.step(body["action"])
                return self._reply(200, {"state": state, "reward": reward, "done": done, "info": None})
            if self.path == "/close":
                return self._reply(200, {"closed": sessions.pop(int(body["env_idx"]), None) is not None})
            self._reply(404, {"detail": "Not Found"})

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["ok", "fail500", "slow"], default="ok")
    args = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(args.mode))
    server.daemon_threads = True
    print(server.server_address[1], flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    sys.exit(0)


if __name__ == "__main__":
    main()
