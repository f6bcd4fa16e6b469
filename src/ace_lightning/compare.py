"""ACE against the single networks it must beat (``python -m ace_lightning.cli action=compare``).

For every run folder given: its cert-net as a single network (natural and certified accuracy on
the test split, certified cheap to tight exactly as the composition is: evaluate.py, cached in the
cert stage folder), its core, and, when the folder was certified, the composition's curve over the
threshold T (sweep_test.csv) with its operating points. One Pareto plot, the table behind it
(CSV), and a sentence per composition: the natural accuracies at which it is certified more often
than every single network that is at least as accurate naturally (the single networks' front).
A search's trial folder (trial.json, search.py) adds one point: its val-chosen operating point on
test; the trials no other trial beats on both counts are the search's front, joined on the plot.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ace_lightning.ace import CertifySettings
from ace_lightning.atomic import atomic_write_text
from ace_lightning.errors import ConfigError, InputNotFoundError

EVALUATION_FILE = "evaluation_test.json"
TRIAL_FILE = "trial.json"  # a search's trial (search.py): its objective on val, its certify folder, its knobs
COLUMNS = ("run", "kind", "name", "method", "alpha", "sabr_lambda", "eps", "threshold", "nat_acc", "cert_acc",
           "adv_acc", "beats_single_front", "search_front")


def describe_cert(manifest: dict) -> dict[str, Any]:
    """Method and its knob, from a cert stage manifest (older manifests: IBP)."""
    st = (manifest.get("config") or {}).get("stage") or {}
    method = st.get("method") or "IBP"
    out = {"method": method, "alpha": None, "sabr_lambda": None}
    if method in ("MTL-IBP", "CC-IBP", "Exp-IBP"):
        out["alpha"] = st.get("alpha")
    if method == "SABR":
        out["sabr_lambda"] = st.get("sabr_lambda")
    if manifest.get("pretrained"):
        out["method"] = f"imported ({method})"
    return out


def _label(info: dict, run: str) -> str:
    knob = f" a={info['alpha']:g}" if info.get("alpha") is not None else (
        f" l={info['sabr_lambda']:g}" if info.get("sabr_lambda") is not None else "")
    return f"{info['method']}{knob} [{run}]"


def certified_folders(run_dir: Path) -> list[Path]:
    """The certify stage folders of a run folder that hold a test sweep (certify/ first)."""
    found = [p for p in sorted(run_dir.glob("certify*")) if (p / "sweep_test.csv").is_file()
             and (p / "operating_points.json").is_file() and ".old-" not in p.name]  # not moved-aside backups
    return sorted(found, key=lambda p: (p.name != "certify", p.name))


def evaluate_cert_stage(run_dir: Path, settings: CertifySettings, *, data_dir: Optional[str] = None,
                        attack_steps: int = 40, batch_size: int = 256, progress: bool = False) -> dict:
    """The cert-net of ``run_dir/cert`` on its test split (evaluate.evaluate_net), cached in
    cert/evaluation_test.json for these weights, eps, settings and attack."""
    import torch

    from ace_lightning.evaluate import evaluate_net
    from ace_lightning.nets import build_net
    from ace_lightning.rundir import load_weights, require_stage, sha256_file, stage_datamodule

    cert_dir = Path(run_dir) / "cert"
    manifest = require_stage(run_dir, "cert", "compare")
    weights = cert_dir / manifest["outputs"]["weights"]["path"]
    key = {"sha256": sha256_file(weights), "eps": manifest.get("eps"), "settings": settings.as_dict(),
           "attack_steps": attack_steps}
    cache = cert_dir / EVALUATION_FILE
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            return cached["result"]
    dm = stage_datamodule(manifest, data_dir)
    dm.setup("test")
    net = build_net(manifest["net"], dm.info)
    load_weights(net, weights, "cert-net")
    loader = torch.utils.data.DataLoader(dm.test_set, batch_size=batch_size, shuffle=False)
    result = evaluate_net(net, loader, float(manifest["eps"]), settings, per_method=False,
                          attack_steps=attack_steps, progress=progress)
    atomic_write_text(cache, json.dumps({"key": key, "result": result}, indent=2))
    return result


def trial_row(run_dir: Path, name: str) -> Optional[dict[str, Any]]:
    """A search trial's row: the composition at its val-chosen operating point (the exported one),
    on test; None for a folder that is no trial. A trial that did not complete is refused."""
    from ace_lightning.rundir import read_manifest

    path = run_dir / TRIAL_FILE
    if not path.is_file():
        return None
    trial = json.loads(path.read_text())
    manifest = (read_manifest(run_dir / str(trial["certify"])) if trial.get("certify") else None) or {}
    chosen = manifest.get("chosen_operating_point") or {}
    if trial.get("status") != "complete" or "test" not in chosen:
        raise InputNotFoundError(f"search trial {run_dir} is not complete (no certified test split): leave it out")
    info = describe_cert(read_manifest(run_dir / "cert") or {})
    test = chosen["test"]
    return {"run": name, "kind": "trial", "name": f"trial {trial.get('trial')} {_label(info, name)}", **info,
            "eps": manifest.get("eps"), "threshold": chosen.get("threshold"),
            "nat_acc": test["nat_acc"], "cert_acc": test["cert_acc"], "adv_acc": test.get("adv_acc", ""),
            "val": chosen.get("val"), "params": trial.get("params") or {}}


def pareto_indices(points: Sequence[dict]) -> list[int]:
    """The points no other point beats on both natural and certified accuracy (ties: the first),
    by natural accuracy."""
    order = sorted(range(len(points)), key=lambda i: (-points[i]["nat_acc"], -points[i]["cert_acc"], i))
    keep, top = [], -math.inf
    for i in order:
        if points[i]["cert_acc"] > top:
            keep.append(i)
            top = points[i]["cert_acc"]
    return sorted(keep, key=lambda i: points[i]["nat_acc"])


def _read_curve(path: Path) -> list[dict[str, float]]:
    with open(path, newline="") as fh:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def single_front(singles: Sequence[dict]) -> callable:
    """F(n) = the best certified accuracy of a single network with natural accuracy >= n
    (-inf where none is that accurate)."""
    pts = sorted(((p["nat_acc"], p["cert_acc"]) for p in singles), reverse=True)

    def front(n: float) -> float:
        best = -math.inf
        for nat, cert in pts:
            if nat + 1e-12 < n:
                break
            best = max(best, cert)
        return best
    return front


def dominance(curve: Sequence[dict], front) -> list[dict[str, float]]:
    """Intervals of natural accuracy where the composition's curve is certified more often than
    every single network at least as accurate naturally: [{nat_from, nat_to, max_gain, at_nat}]."""
    rows = sorted(curve, key=lambda r: r["nat_acc"])
    out: list[dict[str, float]] = []
    current: Optional[dict[str, float]] = None
    for r in rows:
        best = front(r["nat_acc"])
        gain = r["cert_acc"] - (0.0 if best == -math.inf else best)
        if r["cert_acc"] > best + 1e-12:
            if current is None:
                current = {"nat_from": r["nat_acc"], "nat_to": r["nat_acc"], "max_gain": gain, "at_nat": r["nat_acc"]}
                out.append(current)
            current["nat_to"] = r["nat_acc"]
            if gain > current["max_gain"]:
                current["max_gain"], current["at_nat"] = gain, r["nat_acc"]
            # the gain over a network that certifies something (above the most accurate certified
            # one only cores remain, and a gain over 0% certified says nothing)
            if best > 0 and gain > current.get("certified_gain", -math.inf):
                current["certified_gain"], current["certified_at"] = gain, r["nat_acc"]
        else:
            current = None
    return out


def headline(label: str, spans: Sequence[dict], ops: Sequence[dict], top: Optional[dict]) -> str:
    """The sentence for one composition: where it beats every single network at least as accurate
    naturally, and its val-chosen operating point against the most accurate certified single
    network (not against the core, which certifies nothing)."""
    if not spans:
        text = f"- {label}: never certified more often than the best single network at the same or higher natural accuracy"
    else:
        parts = []
        for s in spans:
            part = f"{100 * s['nat_from']:.2f}-{100 * s['nat_to']:.2f}% natural"
            if "certified_gain" in s:
                part += (f" (up to +{100 * s['certified_gain']:.2f} points certified over a certified single network,"
                         f" at {100 * s['certified_at']:.2f}%)")
            parts.append(part)
        text = f"- {label}: dominates the best single network for {'; '.join(parts)}"
    op = next((p for p in ops if p.get("key") == "nat_within_1pt"), ops[0] if ops else None)
    if top is not None and op is not None and "test" in op:
        nat, cert = op["test"]["nat_acc"], op["test"]["cert_acc"]
        text += (f"; at its operating point '{op['name']}' ({100 * nat:.2f}% natural, {100 * cert:.2f}% certified) it is "
                 f"{100 * (nat - top['nat_acc']):+.2f} points natural and {100 * (cert - top['cert_acc']):+.2f} certified "
                 f"against the most accurate certified single network, {top['name']} "
                 f"({100 * top['nat_acc']:.2f}% / {100 * top['cert_acc']:.2f}%)")
    return text + "."


def compare_runs(run_dirs: Sequence[str], out_dir: str, settings: Optional[CertifySettings] = None, *,
                 data_dir: Optional[str] = None, attack_steps: int = 40,
                 progress: bool = False) -> dict[str, Any]:
    """Evaluate, compare, and write compare.csv, compare.png and compare.md into ``out_dir``."""
    from ace_lightning.rundir import read_manifest

    import glob

    settings = settings or CertifySettings()
    expanded: list[str] = []
    for run in run_dirs:  # patterns (an alpha sweep: runs/fmnist_mtl_a*/eps_0.1) expand in sorted order
        matches = sorted(glob.glob(str(Path(run).expanduser()))) if any(c in str(run) for c in "*?[") else [run]
        if not matches:
            raise InputNotFoundError(f"no run folder matches {run}")
        expanded += matches
    run_dirs = expanded
    if not run_dirs:
        raise ConfigError("action=compare needs runs=[<run folder>, ...] (folders holding cert/)")
    rows: list[dict[str, Any]] = []
    curves: list[tuple[str, list[dict[str, float]], list[dict[str, Any]]]] = []
    notes: list[str] = []
    for run in run_dirs:
        run_dir = Path(run).expanduser().resolve()
        trial = trial_row(run_dir, f"{run_dir.parent.parent.name}/{run_dir.parent.name}/{run_dir.name}")
        if trial is not None:  # a search's trial: its one point, no curve and no single network
            rows.append(trial)
            continue
        if not (run_dir / "cert").is_dir():
            raise InputNotFoundError(f"run folder {run_dir} has no cert/ stage to compare")
        name = run_dir.name if not run_dir.name.startswith("eps_") else f"{run_dir.parent.name}/{run_dir.name}"
        cert_manifest = read_manifest(run_dir / "cert") or {}
        info = describe_cert(cert_manifest)
        ev = evaluate_cert_stage(run_dir, settings, data_dir=data_dir, attack_steps=attack_steps, progress=progress)
        rows.append({"run": name, "kind": "cert-net", "name": _label(info, name), **info, "eps": ev["eps"],
                     "threshold": "", "nat_acc": ev["nat_acc"], "cert_acc": ev["cert_acc"], "adv_acc": ev["adv_acc"]})
        core_done = False
        for certify in certified_folders(run_dir):
            # a run folder may hold several compositions of its cert-net: certify/ (gate),
            # certify_entropy/, certify_entropy_cert/ (entropy selection)
            tag = name if certify.name == "certify" else f"{name}, {certify.name.removeprefix('certify_')}"
            sweep = certify / "sweep_test.csv"
            points = json.loads((certify / "operating_points.json").read_text())
            used = ((read_manifest(certify) or {}).get("certification") or {}).get("methods")
            if used and list(used) != list(settings.methods):
                notes.append(f"{tag}: the composition was certified with {'+'.join(used)}, the single "
                             f"networks with {'+'.join(settings.methods)}")
            for ref in points.get("reference_points", []):
                if ref["key"] == "core_alone" and "test" in ref and not core_done:
                    core_done = True
                    rows.append({"run": name, "kind": "core", "name": f"core [{name}]", "method": "core",
                                 "eps": ev["eps"], "threshold": "", "nat_acc": ref["test"]["nat_acc"],
                                 "cert_acc": ref["test"]["cert_acc"], "adv_acc": ref["test"].get("adv_acc", "")})
            ops = [p for p in points.get("operating_points", []) if "test" in p]
            for p in ops:
                rows.append({"run": name, "kind": "ace", "name": f"ACE {p['name']} [{tag}]", **info,
                             "eps": ev["eps"], "threshold": p["threshold"], "nat_acc": p["test"]["nat_acc"],
                             "cert_acc": p["test"]["cert_acc"], "adv_acc": p["test"].get("adv_acc", "")})
            per_class = [p for p in ops if p.get("class_thresholds") is not None]
            label = f"ACE {_label(info, tag)}"
            curves.append((f"{label}, one T" if per_class else label, _read_curve(sweep),
                           [p for p in ops if p.get("class_thresholds") is None]))
            if (certify / "sweep_test_per_class.csv").is_file():  # margin selection: a kappa per class
                curves.append((f"{label}, per-class kappa", _read_curve(certify / "sweep_test_per_class.csv"),
                               per_class))
    singles = [r for r in rows if r["kind"] in ("cert-net", "core")]
    front = single_front(singles)
    certified = [r for r in singles if r["cert_acc"] > 0]
    top = max(certified, key=lambda r: (r["nat_acc"], r["cert_acc"])) if certified else None
    summary_lines = [headline(label, dominance(curve, front), ops, top) for label, curve, ops in curves]
    # one number per curve: its mean certified accuracy over the natural accuracies from the most
    # accurate certified single network up to the core (where a composition has to earn its place)
    cores = [r for r in singles if r["kind"] == "core"]
    span = (top["nat_acc"], max(r["nat_acc"] for r in cores)) if top is not None and cores else None
    means = [{"curve": label, "mean_certified": mean_certified(curve, *span) if span else None} for label, curve, _ in curves]
    if span is not None:
        summary_lines.append(f"- Mean certified accuracy over natural {100 * span[0]:.2f}-{100 * span[1]:.2f}% "
                             f"(most accurate certified single network to the core): "
                             + "; ".join(f"{m['curve']}: {100 * m['mean_certified']:.2f}%" for m in means))
    if top is not None:  # what "the best single network" means above the most accurate certified one: the core
        summary_lines.append(f"- The most accurate certified single network: {top['name']}, "
                             f"{100 * top['nat_acc']:.2f}% natural / {100 * top['cert_acc']:.2f}% certified; "
                             f"above that natural accuracy only cores (0% certified) remain.")
    for r in rows:
        if r["kind"] in ("ace", "trial"):
            r["beats_single_front"] = int(r["cert_acc"] > front(r["nat_acc"]) + 1e-12)
    trials = [r for r in rows if r["kind"] == "trial"]
    on_front = [trials[i] for i in pareto_indices(trials)]
    for r in trials:
        r["search_front"] = int(any(r is f for f in on_front))
    if trials:
        summary_lines.append(search_line(trials, on_front))
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)

    def write_csv(fh) -> None:
        w = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k, "")) for k in COLUMNS})
    paths = {"csv": atomic_write_text(out / "compare.csv", write_csv)}
    paths["png"] = plot_compare(out / "compare.png", curves, singles, front, on_front, trials)
    md = ["# ACE vs single networks (test split)", "",
          f"Single networks certified with {'+'.join(settings.methods)} (cheap to tight), attacked with "
          f"PGD-{attack_steps} (margin loss).", "", *summary_lines, *([""] + [f"Note: {n}" for n in notes] if notes else []),
          "", "| kind | name | T | natural | certified | adversarial |", "|---|---|---|---|---|---|"]
    for r in rows:
        adv = f"{100 * r['adv_acc']:.2f}" if isinstance(r.get("adv_acc"), float) else "-"
        t = r.get("threshold")
        t = t if t == "" else ("(" + ", ".join(format(float(v), ".4g") for v in t) + ")" if isinstance(t, list)
                               else format(float(t), ".4g"))
        md.append(f"| {r['kind']} | {r['name']} | {t} | "
                  f"{100 * r['nat_acc']:.2f} | {100 * r['cert_acc']:.2f} | {adv} |")
    if span is not None:
        md += ["", f"Mean certified accuracy over natural accuracy {100 * span[0]:.2f}-{100 * span[1]:.2f}% "
               f"(test; a curve's best certified accuracy at natural >= n, averaged over n):", "",
               "| curve | mean certified |", "|---|---|"]
        md += [f"| {m['curve']} | {100 * m['mean_certified']:.2f} |" for m in means]

        def write_means(fh) -> None:
            w = csv.writer(fh)
            w.writerow(["curve", "nat_from", "nat_to", "mean_certified"])
            for m in means:
                w.writerow([m["curve"], span[0], span[1], m["mean_certified"]])
        paths["means"] = atomic_write_text(out / "compare_means.csv", write_means)
    paths["md"] = atomic_write_text(out / "compare.md", "\n".join(md) + "\n")
    return {"rows": rows, "summary": summary_lines, "notes": notes, "paths": paths, "means": means, "span": span}


def mean_certified(curve: Sequence[dict], nat_from: float, nat_to: float) -> float:
    """(1 / (b - a)) * integral over n in [a, b] of C(n), C(n) = the best certified accuracy of the
    curve's points with natural accuracy >= n (0 where none reaches n): one number for a whole
    curve on the stretch where it competes; exact, as C is a step function."""
    if nat_to <= nat_from or not curve:
        return 0.0
    nats = np.array([r["nat_acc"] for r in curve], dtype=np.float64)
    certs = np.array([r["cert_acc"] for r in curve], dtype=np.float64)
    order = np.argsort(nats)
    nats, certs = nats[order], certs[order]
    best = np.concatenate([np.maximum.accumulate(certs[::-1])[::-1], [0.0]])  # C at each point's nat
    cuts = np.unique(np.concatenate([[nat_from, nat_to], nats[(nats > nat_from) & (nats < nat_to)]]))
    mids = 0.5 * (cuts[:-1] + cuts[1:])
    values = best[np.searchsorted(nats, mids, side="left")]  # C is constant on each (cut, next cut)
    return float(np.sum(np.diff(cuts) * values) / (nat_to - nat_from))


def search_line(trials: Sequence[dict], on_front: Sequence[dict]) -> str:
    """The sentence for a search: its front on test, each trial with its searched knobs and its
    objective's split (val) numbers beside the test ones."""
    parts = []
    for r in on_front:
        knobs = ", ".join(f"{k.rsplit('.', 1)[-1]}={_short(v)}" for k, v in r["params"].items())
        val = r.get("val") or {}
        seen = f"; val {100 * val['nat_acc']:.2f} / {100 * val['cert_acc']:.2f}" if "nat_acc" in val else ""
        parts.append(f"{r['name'].split(' [')[0]} ({100 * r['nat_acc']:.2f}% natural, {100 * r['cert_acc']:.2f}% "
                     f"certified{seen}; {knobs})")
    beats = sum(int(r.get("beats_single_front", 0)) for r in on_front)
    return (f"- Search: {len(trials)} trials (each at its val-chosen operating point, test split); its front: "
            f"{'; '.join(parts)}. {beats} of the {len(on_front)} on the front are certified more often than every "
            f"single network at least as accurate naturally.")


def _short(value: Any) -> str:
    try:
        return format(float(value), ".3g")
    except (TypeError, ValueError):
        return str(value)


def plot_compare(path: Path, curves, singles, front, search_front=(), trials=()) -> str:
    """ACE curves (lines) and operating points (stars), single networks (markers) and their front,
    a search's trials (small diamonds) and their front (joined)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ace_lightning.report import save_pareto_axes

    fig = Figure(figsize=(8.0, 6.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for j, (label, curve, ops) in enumerate(curves):
        xs = [100 * r["nat_acc"] for r in curve]
        ys = [100 * r["cert_acc"] for r in curve]
        ax.plot(xs, ys, "-", color=f"C{j}", lw=1.3, label=label)
        for p in ops:
            ax.plot(100 * p["test"]["nat_acc"], 100 * p["test"]["cert_acc"], "*", ms=11, color=f"C{j}", mec="black")
    markers = {"core": "s"}
    for r in singles:
        ax.plot(100 * r["nat_acc"], 100 * r["cert_acc"], markers.get(r["kind"], "o"), ms=7, mec="black",
                color="lightgray" if r["kind"] == "core" else "white", zorder=5)
        ax.annotate(r["name"].split(" [")[0], (100 * r["nat_acc"], 100 * r["cert_acc"]), textcoords="offset points",
                    xytext=(5, 4), fontsize=7)
    if trials:
        ax.plot([100 * r["nat_acc"] for r in trials], [100 * r["cert_acc"] for r in trials], "D", ms=4,
                color="tab:purple", alpha=0.45, zorder=6, label=f"search trials ({len(trials)}, val-chosen points)")
        ax.plot([100 * r["nat_acc"] for r in search_front], [100 * r["cert_acc"] for r in search_front], "-D", ms=6,
                color="tab:purple", mec="black", lw=1.2, zorder=6, label=f"search front ({len(search_front)} trials)")
    if singles:
        grid = np.linspace(min(r["nat_acc"] for r in singles), max(r["nat_acc"] for r in singles), 400)
        ax.plot(100 * grid, [100 * max(front(n), 0.0) for n in grid], "--", color="black", lw=0.8,
                label="single networks' front")
    return save_pareto_axes(fig, ax, "ACE vs single networks (test split)", path)
