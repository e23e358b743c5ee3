"""WebShopEnv against a real HTTP server process speaking AgentGym's webshop API (tests/webshop_fake_server.py)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from steptune.envs.base import TaskRef
from steptune.envs.webshop import HttpWebShop, WebShopEnv, WebShopError, parse_action

SERVER = Path(__file__).with_name("webshop_fake_server.py")


def start_server(mode: str = "ok"):
    proc = subprocess.Popen([sys.executable, str(SERVER), "--mode", mode], stdout=subprocess.PIPE, text=True)
    port = int(proc.stdout.readline())
    return proc, f"http://127.0.0.1:{port}"


@pytest.fixture
def shop():
    proc, url = start_server()
    yield url
    proc.terminate()
    proc.wait(timeout=10)


def task(i: int) -> TaskRef:
    return TaskRef("webshop", "webshop", i, "test")


def test_parse_action():
    assert parse_action("search[red mug]") == ("search", "red mug")
    assert parse_action("  Click[Buy Now] ") == ("click", "Buy Now")
    assert parse_action("buy the mug") is None


def test_full_purchase_scores_one(shop):
    env = WebShopEnv(server_url=shop, timeout=5)
    reset = env.reset(task(0))
    assert "red" in reset.task and "[SEP] Search" in reset.observation
    steps = ["search[red ceramic mug]", "click[b0001]", "click[red]", "click[buy now]"]
    results = [env.step(a) for a in steps]
    assert [r.done for r in results] == [False, False, False, True]
    assert [r.reward for r in results] == [0.0, 0.0, 0.0, 1.0]
    assert results[-1].info["won"] is True
    env.close()


def test_wrong_option_gets_partial_score_and_tasks_map_to_sessions(shop):
    env = WebShopEnv(server_url=shop, timeout=5)
    assert [t.variation for t in env.tasks("test")][:3] == [0, 1, 2]
    env.reset(task(1))  # wants the green t-shirt
    for action in ["search[cotton t-shirt]", "click[b0002]", "click[blue]"]:
        env.step(action)
    last = env.step("click[buy now]")
    assert last.done and last.reward == 0.5 and not last.info["won"]
    with pytest.raises(RuntimeError, match="reset"):
        env.step("click[buy now]")


def test_invalid_actions_are_answered_locally(shop):
    env = WebShopEnv(server_url=shop, timeout=5)
    env.reset(task(0))
    bad = env.step("buy a mug please")
    assert bad.info["invalid"] and "neither search" in bad.observation and not bad.done
    bad = env.step("click[b0001]")  # not on the search page
    assert bad.info["invalid"] and "not clickable" in bad.observation
    env.step("search[mug]")
    bad = env.step("search[again]")  # results page has no search bar
    assert bad.info["invalid"] and "no search bar" in bad.observation
    ok = env.step("click[B0001]")  # clickables are matched case-insensitively, as WebShop lowercases them
    assert ok.info["invalid"] is False and "Buy Now" in ok.observation


def test_server_500_raises_clear_error():
    proc, url = start_server("fail500")
    try:
        env = WebShopEnv(server_url=url, timeout=5)
        env.reset(task(0))
        with pytest.raises(WebShopError, match="HTTP 500"):
            env.step("search[mug]")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_server_timeout_raises_without_hanging():
    proc, url = start_server("slow")
    try:
        env = WebShopEnv(server_url=url, timeout=0.5)
        env.reset(task(0))
        start = time.monotonic()
        with pytest.raises(WebShopError, match="timed out"):
            env.step("search[mug]")
        assert time.monotonic() - start < 5
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_unreachable_server_raises():
    with pytest.raises(WebShopError, match="cannot reach"):
        HttpWebShop("http://127.0.0.1:9", timeout=2)


def test_no_server_and_no_webshop_package_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("WEBSHOP_SERVER_URL", raising=False)
    try:
        import web_agent_site  # noqa: F401
    except ImportError:
        with pytest.raises(WebShopError, match="web_agent_site"):
            WebShopEnv()
    else:
        pytest.skip("web_agent_site is installed here; the in-process path is used instead")
