"""The layers of ARCHITECTURE.md, checked on the source: every import (lazy ones inside functions
too) goes to the same floor or a lower one, stages and the certify stage never import each other,
no stage module imports another stage's, and there is no import cycle."""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "src" / "ace_lightning"

# lowest floor first; a module's floor is that of its longest matching prefix
FLOORS = [
    ("ace_lightning", "errors", "atomic", "console", "routing", "rule", "resolvers",
     "registries"),  # 0: no model code
    ("bounds", "nets", "data", "attacks"),                                  # 1: bounds, networks, data
    ("ace", "records", "sweep", "operating", "report", "loggers", "summary", "config",
     "evaluate", "selections"),                                             # 2: the model, the sweep maths
    ("rundir",),                                                            # 3: the run-folder protocol
    ("stages", "certify", "certify_pass", "certify_attack", "compare", "audit", "audit_claims",
     "audit_bounds", "audit_attacks"),                                      # 4: stages
    ("registry", "hydra_callbacks", "search"),                              # 5: dispatch
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


# The stage modules under stages/, by stage: a stage's LightningModule and runner (the gate stage's
# are three: gate.py its LightningModule, gate_run.py its runner, gate_labels.py its labels). The other modules there are shared by the stages
# (what two stages share lives in one of them, never in a stage module) and import no stage module.
STAGE_MODULES = {"core": ("core",), "cert": ("cert",), "gate": ("gate", "gate_labels", "gate_run"),
                 "entropy": ("entropy",)}
SHARED_STAGE_MODULES = ("base", "certified", "common", "configs", "losses", "runner", "schedules")
# the certify stage and the tools beside it, which meet the training stages only through the run folder
CERTIFY_SIDE = ("certify", "compare", "audit")


def stage_of(module: str) -> str | None:
    """The stage a module under stages/ belongs to; None for a shared one (or outside stages/)."""
    parts = module.split(".")
    if parts[:2] != ["ace_lightning", "stages"] or len(parts) < 3:
        return None
    return next((stage for stage, names in STAGE_MODULES.items() if parts[2] in names), None)


def stage_imports(graph: dict[str, set[str]]) -> list[str]:
    """Imports of a stage module by a module of another stage, or by a shared module."""
    return sorted(f"{m} imports {t}" for m, targets in graph.items() if m.startswith("ace_lightning.stages")
                  for t in targets if stage_of(t) is not None and stage_of(t) != stage_of(m))


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
    certify_side = lambda t: t.split(".")[1].startswith(CERTIFY_SIDE) if "." in t else False  # noqa: E731
    for m, targets in graph.items():
        if m.startswith("ace_lightning.stages"):
            assert not {t for t in targets if certify_side(t) or t.split(".")[1] == "registry"}, m
        if certify_side(m):
            assert not {t for t in targets if t.startswith("ace_lightning.stages")}, m
    # ace.py holds the model and the certification rule only: no run folders, no stages
    assert not {t for t in graph["ace_lightning.ace"] if floor(t) >= floor("ace_lightning.rundir")}


def test_no_stage_module_imports_another_stage():
    graph = import_graph()
    names = {m.split(".")[2] for m in graph if m.startswith("ace_lightning.stages.")}
    known = {n for group in STAGE_MODULES.values() for n in group} | set(SHARED_STAGE_MODULES)
    assert names <= known, f"stages/{sorted(names - known)}: add to STAGE_MODULES or SHARED_STAGE_MODULES"
    assert not stage_imports(graph), "\n".join(stage_imports(graph))


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
    # and the stage check: entropy building on the cert stage's module would be caught, the gate
    # stage's own labels module would not
    graph = {"ace_lightning.stages.entropy": {"ace_lightning.stages.cert", "ace_lightning.stages.certified"},
             "ace_lightning.stages.gate": {"ace_lightning.stages.gate_labels"},
             "ace_lightning.stages.certified": {"ace_lightning.stages.base"},
             "ace_lightning.stages.losses": {"ace_lightning.stages.gate_labels"}}
    assert stage_imports(graph) == ["ace_lightning.stages.entropy imports ace_lightning.stages.cert",
                                    "ace_lightning.stages.losses imports ace_lightning.stages.gate_labels"]
