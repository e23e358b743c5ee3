"""WebShop (Yao et al. 2022) as a steptune Env, through the official text environment.

WebShop's product data, search index and spaCy model cannot be installed from PyPI, so steptune does not ship
it. Two ways to reach a WebShop you run yourself:

* in-process: when `web_agent_site` (the WebShop repo) is importable, `gym.make("WebAgentTextEnv-v0", ...)`;
* over HTTP: an AgentGym `agentenv-webshop` server (`webshop --host 127.0.0.1 --port 36001`), whose API is
  POST /create → env id, POST /reset {env_idx, session_id}, POST /step {env_idx, action} →
  {state, reward, done, info}, GET /observation|/instruction_text|/available_actions?env_idx=..., POST /close.

A task is a WebShop goal index (`session_id`). Actions are `search[keywords]` and `click[value]`; an action the
current page does not offer is answered locally with an "invalid action" observation (marked in info) and never
sent to the shop, so a malformed action costs a step but cannot crash or confuse the server. Reward is the
purchase score in 0..1, given when the agent clicks "buy now" (0 before).
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Protocol

from steptune.envs.base import Env, Reset, StepResult, TaskRef

WEBSHOP_INSTRUCTION = (
    "You are web shopping.\n"
    "I will give you instructions about what to do.\n"
    "You have to follow the instructions.\n"
    "Every round I will give you an observation and a list of available actions, you have to respond an action "
    "based on the state and instruction.\n"
    "You can use search action if search is available.\n"
    "You can click one of the buttons in clickables.\n"
    "An action should be of the following structure:\n"
    "search[keywords]\n"
    "click[value]\n"
    "If the action is not valid, perform nothing.\n"
    "Keywords in search are up to you, but the value in click must be a value in the list of available actions.\n"
    "Remember that your keywords in search should be carefully designed.\n"
    "Your response should use the following format:\n\n"
    "Thought: I think ...\n"
    "Action: click[something]"
)

# WebShop's own goal split: goals 0-499 are its test set, 500-1499 dev, the rest train. ETO/STeP evaluate on
# 200 test goals; we default to the first 200 (pass your own ids if your copy of the split differs).
DEFAULT_SPLITS: dict[str, range] = {
    "test": range(200),
    "seen": range(200),
    "dev": range(500, 1500),
    "train": range(1500, 12087),
}

ACTION_RE = re.compile(r"^\s*(search|click)\s*\[(.*)\]\s*$", re.IGNORECASE | re.DOTALL)


class WebShopError(RuntimeError):
    """The WebShop backend failed (server down, HTTP error, timeout, malformed reply)."""


class WebShopBackend(Protocol):
    """What WebShopEnv needs from a running WebShop: one session at a time."""

    def reset(self, session_id: int) -> str: ...  # → first observation
    def step(self, action: str) -> tuple[str, float, bool]: ...
    def instruction_text(self) -> str: ...
    def available_actions(self) -> dict[str, Any]: ...  # {"has_search_bar": bool, "clickables": [str]}
    def close(self) -> None: ...


class HttpWebShop:
    """Client for an AgentGym-style WebShop env server. Every request has a timeout; failures raise WebShopError."""

    def __init__(self, base_url: str, timeout: float = 60.0):
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.env_idx = self._request("POST", "/create", None)
        if not isinstance(self.env_idx, int):
            raise WebShopError(f"{self.base_url}/create returned {self.env_idx!r}, expected an integer env id")

    def _request(self, method: str, path: str, body: dict | None, query: dict | None = None) -> Any:
        url = self.base_url + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            detail = e.read()[:300].decode(errors="replace")
            raise WebShopError(f"WebShop server {method} {path} failed: HTTP {e.code} {detail}") from e
        except TimeoutError as e:
            raise WebShopError(f"WebShop server {method} {path} timed out after {self.timeout}s") from e
        except urllib.error.URLError as e:
            if isinstance(e.reason, TimeoutError):
                raise WebShopError(f"WebShop server {method} {path} timed out after {self.timeout}s") from e
            raise WebShopError(f"cannot reach WebShop server at {self.base_url}: {e.reason}") from e
        try:
            return json.loads(raw)
        except json.JSONDecodeError as e:
            raise WebShopError(f"WebShop server {method} {path} returned non-JSON: {raw[:200]!r}") from e

    def _get(self, path: str) -> Any:
        return self._request("GET", path, None, {"env_idx": self.env_idx})

    def reset(self, session_id: int) -> str:
        self._request("POST", "/reset", {"env_idx": self.env_idx, "session_id": session_id})
        # AgentGym's client also re-reads /observation after reset: the reset reply's text is not always the page
        return _expect_str(self._get("/observation"), "/observation")

    def step(self, action: str) -> tuple[str, float, bool]:
        reply = self._request("POST", "/step", {"env_idx": self.env_idx, "action": action})
        if not isinstance(reply, dict) or not {"state", "reward", "done"} <= reply.keys():
            raise WebShopError(f"/step returned {str(reply)[:200]!r}, expected {{state, reward, done, info}}")
        return str(reply["state"]), float(reply["reward"] or 0.0), bool(reply["done"])

    def instruction_text(self) -> str:
        return _expect_str(self._get("/instruction_text"), "/instruction_text")

    def available_actions(self) -> dict[str, Any]:
        reply = self._get("/available_actions")
        if not isinstance(reply, dict) or "clickables" not in reply:
            raise WebShopError(f"/available_actions returned {str(reply)[:200]!r}")
        return reply

    def close(self) -> None:
        try:
            self._request("POST", "/close", {"env_idx": self.env_idx})
        except WebShopError:
            pass  # older servers have no /close; the session just idles there


class InProcessWebShop:
    """The official `web_agent_site` text env in this process (needs the WebShop repo, its data and index)."""

    def __init__(self, num_products: int | None = None):
        try:
            import gym  # WebShop registers its env with classic gym
            import web_agent_site.envs  # noqa: F401 - registers WebAgentTextEnv-v0
        except ImportError as e:
            raise WebShopError(
                "in-process WebShop needs the WebShop repo (web_agent_site) and gym importable; "
                "or run an AgentGym webshop server and pass server_url"
            ) from e
        kwargs: dict[str, Any] = {"observation_mode": "text"}
        if num_products:
            kwargs["num_products"] = num_products
        self.env = gym.make("WebAgentTextEnv-v0", **kwargs)

    def reset(self, session_id: int) -> str:
        obs, _ = self.env.reset(session=session_id)
        return obs

    def step(self, action: str) -> tuple[str, float, bool]:
        obs, reward, done, _info = self.env.step(action)
        return obs, float(reward or 0.0), bool(done)

    def instruction_text(self) -> str:
        return self.env.get_instruction_text()

    def available_actions(self) -> dict[str, Any]:
        return self.env.get_available_actions()

    def close(self) -> None:
        self.env.close()


def _expect_str(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise WebShopError(f"{what} returned {str(value)[:200]!r}, expected a string")
    return value


def parse_action(action: str) -> tuple[str, str] | None:
    """`search[red shoes]` → ('search', 'red shoes'); anything else → None."""
    m = ACTION_RE.match(action)
    if not m:
        return None
    return m.group(1).lower(), m.group(2).strip()


class WebShopEnv(Env):
    name = "webshop"
    max_steps_default = 10  # ETO's limit

    def __init__(
        self,
        server_url: str | None = None,
        backend: WebShopBackend | None = None,
        timeout: float = 60.0,
        splits: dict[str, range | list[int]] | None = None,
    ):
        """Connect to WebShop: `backend` if given, else the server at `server_url` (or $WEBSHOP_SERVER_URL),
        else the in-process `web_agent_site`."""
        server_url = server_url or os.environ.get("WEBSHOP_SERVER_URL")
        if backend is not None:
            self.backend = backend
        elif server_url:
            self.backend = HttpWebShop(server_url, timeout=timeout)
        else:
            self.backend = InProcessWebShop()
        self.splits = dict(splits or DEFAULT_SPLITS)
        self.reward = 0.0
        self.done = True

    def instruction(self) -> str:
        return WEBSHOP_INSTRUCTION

    def tasks(self, split: str) -> list[TaskRef]:
        if split not in self.splits:
            raise ValueError(f"unknown WebShop split {split!r}; known: {sorted(self.splits)}")
        return [TaskRef(self.name, "webshop", int(i), split) for i in self.splits[split]]

    def reset(self, task: TaskRef) -> Reset:
        observation = self.backend.reset(int(task.variation))
        instruction = self.backend.instruction_text()
        self.reward, self.done = 0.0, False
        return Reset(task=instruction, observation=observation, info={"session_id": int(task.variation)})

    def step(self, action: str) -> StepResult:
        if self.done:
            raise RuntimeError("WebShopEnv.step() after the episode ended; call reset() first")
        page = self.backend.available_actions()
        problem = self._why_invalid(action, page)
        if problem:
            hint = "search[...] or click[...]" if page.get("has_search_bar") else "click[...]"
            observation = f"Invalid action: {problem}. Use {hint}; clickables: {page.get('clickables', [])}"
            return StepResult(observation, self.reward, False, {"invalid": True})
        observation, reward, done = self.backend.step(action.strip())
        self.reward = max(0.0, min(1.0, reward)) if done else self.reward
        self.done = done
        return StepResult(observation, self.reward, done, {"won": done and self.reward >= 1.0, "invalid": False})

    @staticmethod
    def _why_invalid(action: str, page: dict[str, Any]) -> str | None:
        parsed = parse_action(action)
        if parsed is None:
            return f"{action.strip()[:80]!r} is neither search[...] nor click[...]"
        kind, arg = parsed
        if kind == "search":
            if not page.get("has_search_bar"):
                return "there is no search bar on this page"
            if not arg:
                return "empty search"
            return None
        clickables = [str(c).lower() for c in page.get("clickables", [])]
        if arg.lower() not in clickables:
            return f"{arg!r} is not clickable here"
        return None

    def close(self) -> None:
        self.backend.close()
