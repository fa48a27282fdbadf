"""The package's shape: no import cycle among rlhf modules (imports inside functions included)."""

from __future__ import annotations

import ast
from pathlib import Path

import rlhf

ROOT = Path(rlhf.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the rlhf modules it imports anywhere in its source (top level or inside a function)."""
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                # `from rlhf.ppo import core` imports the module rlhf.ppo.core; `from rlhf.io import x`, rlhf.io.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_one():
    """The finder itself: a cycle through an import inside a function (as cli -> ppo -> cli once was) is found."""
    graph = {"rlhf.cli": {"rlhf.ppo.step"}, "rlhf.ppo.step": {"rlhf.io", "rlhf.cli"}, "rlhf.io": set()}
    assert find_cycle(graph) == ["rlhf.cli", "rlhf.ppo.step", "rlhf.cli"]
    graph["rlhf.ppo.step"] = {"rlhf.io"}
    assert find_cycle(graph) is None
    assert "rlhf.ppo.step" in import_graph()["rlhf.cli"], "imports inside functions are read"


# The steps: each a command's flow. Shared layers sit below them and import none of them.
STEPS = ("rlhf.ppo", "rlhf.grpo", "rlhf.reward_model", "rlhf.dpo", "rlhf.sft", "rlhf.merge", "rlhf.cli",
         "rlhf.quickstart")  # fmt: skip


def _is_step(module: str) -> bool:
    return any(module == step or module.startswith(step + ".") for step in STEPS)


def layering_violations(graph: dict[str, set[str]], shared: str = "rlhf.rl") -> list[str]:
    """'A -> B' for each module A of the shared package that imports a step B (anywhere in its source)."""
    return sorted(
        f"{module} -> {target}"
        for module, targets in graph.items()
        if module == shared or module.startswith(shared + ".")
        for target in targets
        if _is_step(target)
    )


def test_rl_imports_no_step():
    """rlhf.rl (what PPO and GRPO share) depends on nothing above it: a helper two steps share moves down into it."""
    assert layering_violations(import_graph()) == []


def test_layering_check_finds_a_violation():
    graph = {
        "rlhf.rl.trainer": {"rlhf.rl.core", "rlhf.io"},
        "rlhf.rl.update": {"rlhf.ppo.core"},
        "rlhf.ppo.core": set(),
    }
    assert layering_violations(graph) == ["rlhf.rl.update -> rlhf.ppo.core"]
    graph["rlhf.rl.update"] = {"rlhf.rl.core"}
    assert layering_violations(graph) == []
