"""The layers of ARCHITECTURE.md, checked on the source: every import (lazy ones inside functions
too) goes to the same floor or a lower one, stages and the certify stage never import each other,
and there is no import cycle."""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "src" / "ace_lightning"

# lowest floor first; a module's floor is that of its longest matching prefix
FLOORS = [
    ("ace_lightning", "errors", "atomic", "console", "routing", "rule"),   # 0: no torch model code
    ("bounds", "nets", "data", "attacks"),                                  # 1: bounds, networks, data
    ("ace", "sweep", "report", "loggers", "summary", "config", "evaluate"),  # 2: the model, the sweep maths
    ("rundir",),                                                            # 3: the run-folder protocol
    ("stages", "certify", "compare", "audit"),                              # 4: stages
    ("registry", "hydra_callbacks"),                                        # 5: dispatch
    ("train", "cli", "pipeline"),                                           # 6: entry points
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def floor(module: str) -> int:
    short = module.removeprefix("ace_lightning.") if module != "ace_lightning" else "ace_lightning"
    best, level = -1, None
    for i, names in enumerate(FLOORS):
        for name in names:
            if (short == name or short.startswith(name + ".")) and len(name) > best:
                best, level = len(name), i
    assert level is not None, f"{module} is on no floor of ARCHITECTURE.md: add it to FLOORS"
    return level


def resolve(target: str, name: str) -> str:
    """``from target import name``: the module it names (a submodule, else ``target``)."""
    full = f"{target}.{name}"
    rel = Path(*full.split(".")[1:])
    if (PKG / rel).with_suffix(".py").is_file() or (PKG / rel / "__init__.py").is_file():
        return full
    return target


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PKG.rglob("*.py"):
        mod = module_name(path)
        edges = graph.setdefault(mod, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ace_lightning"):
                edges.update(resolve(node.module, a.name) for a in node.names)
            elif isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name.startswith("ace_lightning"))
        edges.discard(mod)
    return graph


def test_every_import_goes_down_or_sideways():
    upward = [f"{m} (floor {floor(m)}) imports {t} (floor {floor(t)})"
              for m, targets in import_graph().items() for t in targets if floor(t) > floor(m)]
    assert not upward, "\n".join(sorted(upward))


def test_stages_and_certify_meet_only_through_the_run_folder():
    graph = import_graph()
    for m, targets in graph.items():
        if m.startswith("ace_lightning.stages"):
            assert not {t for t in targets if t.split(".")[1] in ("certify", "compare", "registry")}, m
        if m in ("ace_lightning.certify", "ace_lightning.compare"):
            assert not {t for t in targets if t.startswith("ace_lightning.stages")}, m
    # ace.py holds the model and the certification rule only: no run folders, no stages
    assert not {t for t in graph["ace_lightning.ace"] if floor(t) >= floor("ace_lightning.rundir")}


def test_no_import_cycle():
    graph = import_graph()
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in graph.get(m, ()):
            if t in graph and t not in ("ace_lightning",) and state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path + [m, t]))
            if t in graph and state.get(t) is None:
                visit(t, path + [m])
        state[m] = 2

    for m in sorted(graph):
        if state.get(m) is None:
            visit(m, [])


def test_the_layer_check_catches_an_upward_import(tmp_path):
    """The check itself can fail: a stage importing the certify stage is an upward import."""
    assert floor("ace_lightning.stages.gate") == floor("ace_lightning.certify")
    assert floor("ace_lightning.registry") > floor("ace_lightning.stages.gate")
    assert floor("ace_lightning.ace") < floor("ace_lightning.rundir")
