"""steptune's layers only point down: a module imports from its own layer or the ones below it, never above.

Every import counts, the lazy ones inside functions and those under `if TYPE_CHECKING:` included: a lazy upward
import is still a cycle between folders, only one that shows up later. Run alone: python -m pytest tests/test_layers.py
"""

import ast
from pathlib import Path

import steptune

LAYERS = ["errors", "threads", "envs", "data", "models", "backends", "teacher", "training", "agent", "synthesis", "evaluation",
          "pipeline", "cli"]
PACKAGE = Path(steptune.__file__).parent


def layer_of(module: str) -> str | None:
    """The layer of a dotted module name inside steptune (None: outside steptune, or the package root)."""
    parts = module.split(".")
    if parts[0] != "steptune" or len(parts) < 2:
        return None
    return parts[1]


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, dotted module) of every import in the file, at any depth, relative imports resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path, root).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            if node.module is None or module == "steptune":  # `from steptune import cli` names modules too
                found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, module))
    return found


def upward_imports(root: Path = PACKAGE) -> list[str]:
    rank = {name: i for i, name in enumerate(LAYERS)}
    problems = []
    for path in sorted(root.rglob("*.py")):
        own = layer_of(module_name(path, root))
        for line, module in imported_modules(path, root):
            target = layer_of(module)
            if own is None or target is None or target not in rank or target == own:
                continue
            if own not in rank or rank[target] > rank[own]:
                problems.append(f"{path.relative_to(root.parent)}:{line} imports {module} "
                                f"({own} → {target}, but {target} is above {own})")
    return problems


def test_every_steptune_folder_is_a_layer():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    modules = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    assert folders | modules <= set(LAYERS), f"place {sorted((folders | modules) - set(LAYERS))} in LAYERS"


def test_imports_only_point_down():
    problems = upward_imports()
    assert not problems, "upward imports (layers: " + " → ".join(LAYERS) + "):\n" + "\n".join(problems)


def test_the_check_sees_lazy_and_relative_imports(tmp_path):
    """The checker itself: an upward import hidden in a function, or written relative, is found."""
    pkg = tmp_path / "steptune"
    for folder in ("teacher", "agent"):
        (pkg / folder).mkdir(parents=True)
        (pkg / folder / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "agent" / "rollout.py").write_text("")
    (pkg / "teacher" / "lazy.py").write_text("def f():\n    from steptune.agent.rollout import run\n")
    (pkg / "teacher" / "rel.py").write_text("from ..agent import rollout\n")
    (pkg / "agent" / "fine.py").write_text("from steptune.teacher import lazy\nfrom . import rollout\n")
    found = upward_imports(pkg)
    assert [p.split(" ")[0] for p in found] == ["steptune/teacher/lazy.py:2", "steptune/teacher/rel.py:1"]
