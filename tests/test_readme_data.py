"""The examples of "Bringing your own data" (docs/data.md, linked from the README) import as written, and mean what
the page says; every page the README links to exists."""

import re
from pathlib import Path

from steptune.data.formats import read_any

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DATA_PAGE = ROOT / "docs" / "data.md"


def data_blocks() -> list[tuple[str, str]]:
    text = DATA_PAGE.read_text(encoding="utf-8")
    section = text.split("## Bringing your own data", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(jsonl?)\n(.*?)```", section, re.DOTALL)


def test_readme_data_examples_import(tmp_path):
    blocks = data_blocks()
    trajs = []
    for n, (lang, body) in enumerate(blocks):
        path = tmp_path / f"example{n}.{lang}"
        path.write_text(body, encoding="utf-8")
        trajs.append(read_any(path))
    eto, icl, agentgym, openai, axolotl = (t[0] for t in trajs)
    assert eto.meta["game_file"].endswith("game.tw-pddl") and eto.task.startswith("You are in the middle of a room")
    assert [s.action for s in eto.steps] == ["go to toilet 1", "take toiletpaper 1 from toilet 1"]
    assert icl.instruction == "" and [s.action for s in icl.steps] == ["teleport to kitchen", "move pot to stove"]
    assert [s.action for s in agentgym.steps] == ["search[red mug]", "click[B0001]"]
    assert agentgym.task.startswith("WebShop [SEP]") and agentgym.meta == {"item_id": "webshop_7"}
    assert [(s.weight, s.kind) for s in openai.steps] == [(0, "error"), (1, "expert"), (1, "expert")]
    assert openai.instruction.startswith("Find the coin")
    assert [(s.thought, s.action, s.weight) for s in axolotl.steps] == [("Look first.", "look around", 1),
                                                                        ("", "take coin", 1)]


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    heads = re.findall(r"(?m)^#+ (.*)$", page.read_text(encoding="utf-8"))
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}


def test_every_link_of_the_readme_and_the_docs_reaches_an_existing_page_and_heading():
    pages = [README, *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text(encoding="utf-8")):
            if "://" in target:
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists() or (anchor and anchor not in _anchors(dest)):
                broken.append(f"{page.name}: {target}")
    assert broken == []
    linked = set(re.findall(r"\]\((docs/[^)#\s]+)", README.read_text(encoding="utf-8")))
    # every page that took a README section is reachable from the README
    assert {"docs/data.md", "docs/reproducibility.md", "docs/stage2.md", "docs/environments.md",
            "docs/benchmarks.md"} <= linked
