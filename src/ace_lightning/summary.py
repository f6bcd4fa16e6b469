"""One table across every run under a runs root (Hydra sweeps over datasets, epsilons and seeds
produce one run folder per combination): summary.csv and summary.md, rewritten atomically after
each certify stage and after each multirun; runs that differ only in their seed also get
summary_seeds.csv / .md (mean +- std, n).

Every launcher job (``ace-train ...``) records its outcome in ``<run_dir>/job.json`` (running,
complete, or failed with its one-line error and the stage that failed), so the table lists every
job of a sweep, also the ones that certified nothing."""
from __future__ import annotations

import csv
import io
import json
import math
import re
import time
from pathlib import Path
from typing import Any, Optional

from ace_lightning.atomic import atomic_write_text
from ace_lightning.errors import CommandParser, fail

COLUMNS = ("run", "data", "eps", "seed", "selection", "point", "threshold", "nat_acc", "cert_acc", "adv_acc",
           "cert_route_rate", "status", "error")
METRICS = ("threshold", "nat_acc", "cert_acc", "adv_acc", "cert_route_rate")
JOB_STATE = "job.json"  # <run_dir>/job.json: the last launcher job that ran in the run folder
JOB_STATUSES = ("running", "complete", "failed", "interrupted")
# The multirun a job belongs to: set by the multirun (hydra_callbacks.SweepGuard) in its environment,
# which the launchers' job processes inherit, and recorded in each job's job.json. Several sweeps, and
# single runs, can share a runs root at the same time: a sweep judges only its own jobs.
SWEEP_ENV = "ACE_SWEEP_ID"


# -- job records -------------------------------------------------------------------------------------

def write_job_state(run_dir: Path, state: dict[str, Any]) -> dict[str, Any]:
    """Write ``<run_dir>/job.json`` atomically (the folder is made if needed); returns the state."""
    body = {**state, "updated": time.time()}
    atomic_write_text(Path(run_dir) / JOB_STATE, json.dumps(body, indent=2, default=str))
    return body


def read_job_state(run_dir: Path) -> Optional[dict[str, Any]]:
    path = Path(run_dir) / JOB_STATE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def job_states(runs_root: Path, since: Optional[float] = None,
               sweep: Optional[str] = None) -> dict[str, dict[str, Any]]:
    """Run name (relative to ``runs_root``) -> job record of every run folder below it; ``since``
    (a time.time()): only jobs started then or later; ``sweep`` (a multirun's SWEEP_ENV id): only
    that multirun's jobs (and multirun jobs that recorded no id, started since ``since``: a launcher
    that did not pass the environment on), not single runs or other sweeps running beside it."""
    runs_root = Path(runs_root)
    out = {}
    for path in sorted(runs_root.glob(f"**/{JOB_STATE}")):
        if ".multirun" in path.parts or "wandb" in path.parts:
            continue
        state = read_job_state(path.parent)
        if state is None or (since is not None and float(state.get("started", 0)) < since):
            continue
        if sweep is not None and state.get("sweep") != sweep and not (
                state.get("sweep") is None and state.get("multirun")):
            continue
        out[str(path.parent.relative_to(runs_root))] = state
    return out


# -- the table ----------------------------------------------------------------------------------------

def collect(runs_root: Path) -> list[dict[str, Any]]:
    """One row per operating point of every complete certification, and one per job whose run
    folder holds none (a failed job: its one-line error)."""
    runs_root = Path(runs_root)
    jobs = job_states(runs_root)
    rows, certified = [], set()
    for manifest in sorted(runs_root.glob("**/certify*/manifest.json")):
        m = json.loads(manifest.read_text())
        if m.get("status") != "complete":
            continue
        run = str(manifest.parent.parent.relative_to(runs_root))
        certified.add(run)
        job = jobs.get(run) or {}
        data = m.get("config", {}).get("spec", {}).get("data", {}).get("name", "")
        for key, metrics in (m.get("metrics") or {}).items():
            rows.append({"run": run, "data": data, "eps": m.get("eps"), "seed": run_seed(run, job),
                         "selection": m.get("selection"),
                         "point": key, **{c: metrics.get(c) for c in METRICS},
                         "status": job.get("status", "complete"), "error": job.get("error")})
    for run, job in jobs.items():
        if run not in certified:
            rows.append({"run": run, "data": job.get("data"), "eps": job.get("eps"), "seed": run_seed(run, job),
                         "status": job.get("status"),
                         "error": job.get("error") if job.get("status") != "complete" else None})
    return rows


_SEED = re.compile(r"_seed(\d+)$")  # config.seed_suffix: seed 0 has none


def run_seed(run: str, job: Optional[dict[str, Any]] = None) -> int:
    """A run folder's seed: its job record's, else its name's ``_seed<n>`` (0 without one)."""
    if job and job.get("seed") is not None:
        return int(job["seed"])
    found = _SEED.search(run)
    return int(found.group(1)) if found else 0


def seed_groups(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs that differ only in their seed, aggregated: one row per (run without its seed part,
    selection, point) with n, the seeds, and mean and sample standard deviation (n - 1) of every
    metric; only groups of complete runs with at least two seeds."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("status") == "complete" and r.get("point"):
            key = (_SEED.sub("", r["run"]), r.get("data"), r.get("eps"), r.get("selection"), r["point"])
            groups.setdefault(key, []).append(r)
    out = []
    for (run, data, eps, selection, point), members in groups.items():
        seeds = sorted({int(m["seed"]) for m in members})
        if len(seeds) < 2:
            continue
        row: dict[str, Any] = {"run": run, "data": data, "eps": eps, "selection": selection, "point": point,
                               "n": len(members), "seeds": " ".join(map(str, seeds))}
        for metric in SEED_METRICS:
            values = [float(m[metric]) for m in members if isinstance(m.get(metric), (int, float))
                      and math.isfinite(float(m[metric]))]
            mean = sum(values) / len(values) if values else None
            row[metric] = mean
            row[f"{metric}_std"] = (math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
                                    if len(values) > 1 else None)
        out.append(row)
    return out


SEED_METRICS = ("nat_acc", "cert_acc", "adv_acc", "cert_route_rate")
SEED_COLUMNS = ("run", "data", "eps", "selection", "point", "n", "seeds",
                *[c for m in SEED_METRICS for c in (m, f"{m}_std")])


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _md_cell(row: dict[str, Any], column: str) -> str:
    v = row.get(column)
    if column.endswith(("_acc", "_rate")) and isinstance(v, float):
        return f"{100 * v:.1f}%"
    return _fmt(v).replace("|", "\\|")


def write_summary(runs_root: Path) -> list[dict[str, Any]]:
    """summary.csv and summary.md under ``runs_root``; returns the rows (nothing written if none)."""
    runs_root = Path(runs_root)
    rows = collect(runs_root)
    if not rows:
        return rows
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")  # errors hold commas: quoted where needed
    writer.writerow(COLUMNS)
    writer.writerows([[_fmt(r.get(c)) for c in COLUMNS] for r in rows])
    atomic_write_text(runs_root / "summary.csv", buf.getvalue())
    md = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    md += ["| " + " | ".join(_md_cell(r, c) for c in COLUMNS) + " |" for r in rows]
    atomic_write_text(runs_root / "summary.md", "\n".join(md) + "\n")
    seeds = seed_groups(rows)
    if seeds:  # summary_seeds.csv / .md: mean +- std over the seeds of each run
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(SEED_COLUMNS)
        writer.writerows([[_fmt(r.get(c)) for c in SEED_COLUMNS] for r in seeds])
        atomic_write_text(runs_root / "summary_seeds.csv", buf.getvalue())
        head = ["run", "data", "eps", "selection", "point", "n", *SEED_METRICS]
        md = ["Mean +- sample standard deviation over seeds (runs that differ only in `seed`).", "",
              "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in seeds:
            cells = [_fmt(r.get(c)).replace("|", "\\|") for c in head[:6]]
            cells += [f"{100 * r[m]:.2f} +- {100 * r[m + '_std']:.2f}" if r.get(m) is not None
                      and r.get(m + "_std") is not None else "" for m in SEED_METRICS]
            md.append("| " + " | ".join(cells) + " |")
        atomic_write_text(runs_root / "summary_seeds.md", "\n".join(md) + "\n")
    return rows


def stage_times(run_dir: Path, since: float = 0.0) -> dict[str, float]:
    """Wall-clock seconds of each completed stage of one run folder (from the manifests), only
    those written at or after the time ``since`` (seconds since the epoch)."""
    out = {}
    for manifest in sorted(Path(run_dir).glob("*/manifest.json")):
        if manifest.stat().st_mtime < since:
            continue
        m = json.loads(manifest.read_text())
        if m.get("status") == "complete" and "wall_s" in m:
            out[manifest.parent.name] = float(m["wall_s"])
    return out


def format_stage_times(times: dict[str, float]) -> str:
    """``core 2.0 min, cert 3.4 min, ...; total 7.8 min`` (seconds below a minute)."""
    def t(s: float) -> str:
        return f"{s / 60:.1f} min" if s >= 60 else f"{s:.1f} s"
    return ", ".join(f"{k} {t(v)}" for k, v in times.items()) + f"; total {t(sum(times.values()))}"


def main(argv: list[str] | None = None) -> int:
    """``python -m ace_lightning.summary [--no-table] RUN_DIR``: the certify table and the stage
    times. The table and the times are this command's product, so they are printed (stdout), not
    logged; ``--no-table`` leaves the table out."""
    parser = CommandParser("ace_lightning.summary", "A run folder's certify tables (certify*/table.txt), the "
                           "wall-clock time of each stage and where the Pareto plots are.")
    parser.add_argument("run_dir", type=Path, help="the run folder, e.g. runs/demo_fmnist/eps_0.1")
    parser.add_argument("--no-table", action="store_true", help="only the stage times and the plots")
    args = parser.parse_args(argv)
    tables = sorted(args.run_dir.glob("certify*/table.txt"))  # certify/ (gate), certify_margin/, ...
    if not tables:
        fail(f"no certify*/table.txt in {args.run_dir}: run the certify stage first")
    if not args.no_table:
        for table in tables:
            print(f"{table.parent.name}: " + table.read_text().rstrip() + "\n")
    print("wall-clock per stage: " + format_stage_times(stage_times(args.run_dir)))
    print("Pareto plot: " + ", ".join(str(t.parent / "pareto.png") for t in tables))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
