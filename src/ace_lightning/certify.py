"""Batched certification of a composed model -> one record per input (docs/METHOD.md section 4.5).

T enters no bound, so one pass that stores (core_correct, cert_correct, cert_ok, core_ok, g, lb_g,
ub_g) per input gives the natural-vs-certified curve for every threshold (sweep.py); the reference
code re-certified for every T. Certificates take the best of several bound methods per input (an
IBP-trained net is often certified more often by IBP than by CROWN): cert_ok is the OR over
methods, the gate interval the intersection of the (sound) intervals.

Runs in Lightning's predict loop, so ``trainer=ddp`` shards the inputs over ranks; each rank writes
its shard and rank 0 merges them (deduplicated by index) into records.csv, atomically.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, Dataset

from ace_lightning.ace import ACEModel, CertifySettings, certify_batch, method_name
from ace_lightning.atomic import atomic_write_text
from ace_lightning.bounds import METHODS
from ace_lightning.config import datamodule_from, to_dict
from ace_lightning import console, rule
from ace_lightning.console import log
from ace_lightning.errors import ConfigError, SoundnessError
from ace_lightning.report import format_table
from ace_lightning.rundir import config_hash, load_model, read_manifest, sha256_file, spec_from_run, write_manifest

SPLITS = ("val", "test")


class IndexedSubset(Dataset):
    """(x, y, dataset index): records are keyed by the index into the underlying split."""

    def __init__(self, subset, indices: Sequence[int]) -> None:
        self.subset, self.indices = subset, list(indices)

    def __len__(self) -> int:
        return len(self.subset)

    def __getitem__(self, i: int):
        x, y = self.subset[i]
        return x, y, self.indices[i]


class CertifyModule(L.LightningModule):
    """Lightning's predict loop over the splits (DDP shards the inputs): one certify_batch per batch."""

    def __init__(self, model: ACEModel, eps: float, settings: CertifySettings):
        super().__init__()
        self.model, self.eps, self.settings = model, float(eps), settings

    def predict_step(self, batch, batch_idx, dataloader_idx: int = 0):
        x, y, idx = batch
        rec = certify_batch(self.model, x, y, self.eps, self.settings)
        rec["index"] = idx
        rec["split"] = torch.full_like(idx, dataloader_idx)
        return {k: v.detach().cpu() for k, v in rec.items()}


class _ShardWriter(BasePredictionWriter):
    """Each rank saves its records; rank 0 merges after the barrier."""

    def __init__(self, out_dir: Path) -> None:
        super().__init__(write_interval="epoch")
        self.out_dir = Path(out_dir)

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices):
        flat = [b for loader in (predictions if predictions and isinstance(predictions[0], list) else [predictions])
                for b in loader]
        merged = {k: torch.cat([b[k] for b in flat]) for k in flat[0]} if flat else {}
        self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(merged, self.out_dir / f".records.rank{trainer.global_rank}.pt")


def record_columns(merged: Mapping[str, torch.Tensor], split_names: Sequence[str],
                   selections: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """Tensors of certify_batch -> record columns: method codes as names, the deciding dtype
    (float64 where the pass was float64 or the input was re-checked), flags as 0/1, and each
    pair's selection kind (``selections``: the sweep reads margin selection's class thresholds
    from it)."""
    cols = {k: v.numpy() if torch.is_tensor(v) else np.asarray(v) for k, v in merged.items()}
    n = len(next(iter(cols.values())))
    for i, kind in enumerate(selections):
        cols["selection" if len(selections) == 1 else f"selection_{i + 1}"] = np.full(n, kind)
    if "split" in cols and cols["split"].dtype.kind in "iu":
        cols["split"] = np.array([split_names[int(s)] for s in cols["split"]])
    for k in [k for k in cols if k.startswith(("cert_method", "gate_method"))]:
        cols[k] = np.array([method_name(c) for c in cols[k]])
    wide = cols.pop("float64").astype(bool) | cols["rechecked"].astype(bool)
    cols["dtype"] = np.where(wide, "float64", "float32")
    for k, v in list(cols.items()):
        if v.dtype == np.bool_:
            cols[k] = v.astype(np.int64)
    return cols


def compute_records(model: ACEModel, loaders: Mapping[str, DataLoader], eps: float,
                    settings: Optional[CertifySettings] = None,
                    trainer_kwargs: Optional[Mapping[str, Any]] = None, work_dir: Optional[Path] = None
                    ) -> Optional[dict[str, np.ndarray]]:
    """Columns of the records (rank 0; None on other ranks). Always full precision: the
    trainer's ``precision`` is not used (certification decides what float32 or float64 means)."""
    names = list(loaders)
    module = CertifyModule(model.eval(), eps, settings or CertifySettings())
    kwargs = {k: v for k, v in dict(trainer_kwargs or {}).items() if k != "precision"}
    kwargs.setdefault("logger", False)
    kwargs.setdefault("enable_checkpointing", False)
    kwargs.setdefault("inference_mode", False)
    writer = _ShardWriter(Path(work_dir or ".")) if work_dir is not None else None
    bar = console.progress_bar_callbacks(bool(kwargs.get("enable_progress_bar", True)))  # on stderr
    trainer = L.Trainer(callbacks=[*([writer] if writer else []), *bar], precision="32-true", **kwargs)
    preds = trainer.predict(module, dataloaders=[loaders[n] for n in names],
                            return_predictions=writer is None)
    if writer is not None:
        trainer.strategy.barrier()
        if not trainer.is_global_zero:
            return None
        shards = sorted(Path(work_dir).glob(".records.rank*.pt"))
        parts = [torch.load(p, weights_only=True) for p in shards]
        for p in shards:
            p.unlink()
        merged = {k: torch.cat([p[k] for p in parts if p]) for k in parts[0]}
    else:
        flat = [b for loader in (preds if len(names) > 1 else [preds]) for b in loader]
        merged = {k: torch.cat([b[k] for b in flat]) for k in flat[0]}
    # DistributedSampler pads with repeats: keep the first record of each (split, index)
    key = merged["split"].long() * 10**9 + merged["index"].long()
    _, first = np.unique(key.numpy(), return_index=True)
    order = np.sort(first)
    return record_columns({k: v[torch.as_tensor(order)] for k, v in merged.items()}, names, model.selection)


def refine_records(model: ACEModel, loaders: Mapping[str, DataLoader], cols: dict[str, np.ndarray],
                   eps: float, settings: CertifySettings, thresholds: Sequence[Sequence[float]],
                   batch_size: int = 256, progress: bool = False,
                   class_thresholds: Sequence[Sequence[float]] = ()) -> int:
    """Certify again, at the given threshold vectors (one T per pair), the inputs whose gate
    interval matters there: it straddles one (refine_methods can decide it) or an end lies within
    recheck_tol of one (float64 decides it). Rows of ``cols`` are updated in place, each gate
    interval *intersected* with the one it had (both are sound), so a refinement made at an
    earlier threshold is never lost; returns how many inputs were redone. Runs on rank 0 (the
    inputs are few). ``class_thresholds``: margin selection's per-class vectors (one pair): each
    input is refined at its own class's threshold only."""
    from ace_lightning.bounds.ladder import near_thresholds, undecided_at

    n = model.num_branches
    sfx = [""] if n == 1 else [f"_{i + 1}" for i in range(n)]
    want = np.zeros(len(cols["index"]), dtype=bool)
    for i, s in enumerate(sfx):
        lb, ub = torch.as_tensor(cols[f"lb_g{s}"]), torch.as_tensor(cols[f"ub_g{s}"])
        ts = sorted({float(t[i]) for t in thresholds})
        margin = model.selection[i] == "margin"
        if settings.refine_methods:
            undecided = undecided_at(lb, ub, ts)
            want |= (undecided & (lb > 0) if margin else undecided).numpy()  # margin: only a certified class can gain
        if settings.recheck_tol > 0:  # margin selection's lb = 0 is the exact clamp gap >= 0
            want |= near_thresholds(lb, ub, ts, settings.recheck_tol, (lb == 0) if margin else None).numpy()
    per_row = []  # each class-threshold vector as one threshold per input (its class's)
    for kappa in class_thresholds:
        lb, ub = torch.as_tensor(cols["lb_g"]), torch.as_tensor(cols["ub_g"])
        t = torch.as_tensor(kappa, dtype=torch.float64)[torch.as_tensor(np.asarray(cols["cert_pred"], dtype=np.int64))]
        per_row.append(t)
        if settings.refine_methods:
            want |= (undecided_at(lb, ub, [t]) & (lb > 0)).numpy()
        if settings.recheck_tol > 0:
            want |= near_thresholds(lb, ub, [t, float(min(kappa))], settings.recheck_tol, lb == 0).numpy()
    rows = np.flatnonzero(want)
    if rows.size == 0:
        return 0
    positions = {name: {int(i): k for k, i in enumerate(loader.dataset.indices)} for name, loader in loaders.items()}
    chunks = [rows[start:start + batch_size] for start in range(0, rows.size, batch_size)]
    at = " and ".join(([f"T={_ts(thresholds)}"] if thresholds else [])
                      + (["per-class thresholds"] if class_thresholds else []))
    for chunk in console.progress(chunks, progress, desc=f"refine {rows.size} inputs at {at}"):
        items = [loaders[str(cols["split"][r])].dataset[positions[str(cols["split"][r])][int(cols["index"][r])]]
                 for r in chunk]
        x = torch.stack([torch.as_tensor(it[0]) for it in items])
        y = torch.as_tensor([int(it[1]) for it in items])
        rec = certify_batch(model, x, y, eps, settings, thresholds=[list(t) for t in thresholds]
                            + [[t[torch.as_tensor(chunk)]] for t in per_row])
        rec["index"], rec["split"] = torch.as_tensor(cols["index"][chunk]), cols["split"][chunk]
        new = record_columns(rec, [])
        for s in sfx:
            lb, ub, method = f"lb_g{s}", f"ub_g{s}", f"gate_method{s}"
            new[lb] = np.maximum(new[lb], np.asarray(cols[lb][chunk], dtype=new[lb].dtype))
            new[ub] = np.minimum(new[ub], np.asarray(cols[ub][chunk], dtype=new[ub].dtype))
            old_method = np.array([METHOD_CODES.get(str(m), -1) for m in cols[method][chunk]])
            new_method = np.array([METHOD_CODES.get(str(m), -1) for m in new[method]])
            new[method] = np.where(old_method > new_method, cols[method][chunk], new[method])
        for flag in ("rechecked", "recheck_flipped"):
            new[flag] = np.maximum(new[flag], np.asarray(cols[flag][chunk], dtype=new[flag].dtype))
        new["dtype"] = np.where(np.asarray(cols["dtype"][chunk]) == "float64", "float64", new["dtype"])
        for k, v in new.items():
            if k in cols:
                text = "U" in (cols[k].dtype.kind, v.dtype.kind)
                cols[k] = cols[k].astype(object if text else np.result_type(cols[k], v))
                cols[k][chunk] = v
    return int(rows.size)


def _ts(thresholds: Sequence[Sequence[float]]) -> str:
    return ",".join("(" + ",".join(f"{v:.4g}" for v in t) + ")" if len(t) > 1 else f"{t[0]:.4g}"
                    for t in thresholds) or "-"


METHOD_CODES = {name: k for k, name in enumerate(METHODS)}  # tightness order of the records' method names


# -- the certify stage: run folder -> records -> sweep/report -> attack -> composed model ----------

def _loaders(dm, splits: Sequence[str], batch_size: int) -> dict[str, DataLoader]:
    dm.setup("test")
    sets = {"val": (dm.val_set, dm.val_indices), "test": (dm.test_set, dm.test_indices)}
    out = {}
    for split in splits:
        if split not in sets:
            raise ConfigError(f"unknown split {split!r}; certify knows val and test")
        subset, idx = sets[split]
        if len(subset) == 0:
            raise ConfigError(f"the {split} split is empty (data.val_size=0?): certify needs it to "
                             f"choose thresholds on val and report them on test")
        out[split] = DataLoader(IndexedSubset(subset, idx), batch_size=batch_size, shuffle=False,
                                num_workers=dm.num_workers)
    return out


def certify_folder(selection: str, entropy_stage: str = "entropy", cascade: Any = None) -> str:
    """certify/ (gate), certify_margin/ (margin selection on the cert stage's net),
    certify_entropy/ (the entropy stage's cert-net), certify_entropy_<stage>/, certify_cascade/."""
    if cascade:
        return "certify_cascade"
    if selection == "gate":
        return "certify"
    if selection == "margin":
        return "certify_margin"
    return "certify_entropy" if entropy_stage == "entropy" else f"certify_entropy_{entropy_stage}"


def write_records(cols: Mapping[str, np.ndarray], stage_dir: Path) -> Path:
    """records.csv, and records.parquet when pyarrow is installed (never a stale one beside it)."""
    from ace_lightning.sweep import parquet_available, save_records

    records_path = Path(stage_dir) / "records.csv"
    save_records(cols, records_path)
    parquet = Path(stage_dir) / "records.parquet"
    if parquet_available():  # the same records for pandas/polars/duckdb users
        save_records(cols, parquet)
    else:
        parquet.unlink(missing_ok=True)
    return records_path


MAX_REFINE_ROUNDS = 100  # a guard against a bug, never a way to stop early: hitting it is an error


def refine_at_operating_points(model: ACEModel, loaders: Mapping[str, DataLoader], cols: dict[str, np.ndarray],
                               eps: float, settings: CertifySettings, thresholds: Optional[Sequence[Any]],
                               grid: Any = None, tolerance: float = 0.01, batch_size: int = 256,
                               progress: bool = False) -> dict[str, Any]:
    """Refine gate intervals (refine_methods, the float64 re-check) at every threshold the report
    and the export will use: the configured ``thresholds`` and the operating points chosen on val
    (threshold vectors for a cascade). Refining moves the records and with them the val choice, so
    the choice is repeated until every chosen threshold has been refined (intervals only tighten,
    each input has finitely many refinements, so this ends; ``MAX_REFINE_ROUNDS`` guards against a
    bug). The report, the attack and the exported model then read records that were refined and
    re-checked at their T."""
    from ace_lightning.sweep import val_class_thresholds, val_operating_thresholds

    n = model.num_branches
    as_vector = lambda t: tuple(float(v) for v in t) if isinstance(t, (list, tuple)) else (float(t),)  # noqa: E731
    done: list[tuple[float, ...]] = []
    redone = rounds = 0
    fixed = [as_vector(t) for t in thresholds] if thresholds is not None else []
    if any(len(t) != n for t in fixed):
        raise ConfigError(f"stage.thresholds: give {n} threshold(s) per entry (one per cascade pair), got {fixed}")
    done_kappa: list[tuple[float, ...]] = []
    while True:
        wanted = set(fixed) | {as_vector(t) for t in val_operating_thresholds(cols, grid, tolerance)}
        new = sorted(t for t in wanted if t not in done and any(math.isfinite(v) for v in t))
        kappa = val_class_thresholds(cols, tolerance) if n == 1 and model.selection[0] == "margin" else None
        new_kappa = [kappa] if kappa is not None and kappa not in done_kappa else []
        if not new and not new_kappa:
            break
        rounds += 1
        if rounds > MAX_REFINE_ROUNDS:
            raise RuntimeError(f"refinement did not settle after {MAX_REFINE_ROUNDS} rounds (thresholds {new})")
        redone += refine_records(model, loaders, cols, eps, settings, new, batch_size, progress, new_kappa)
        done += new
        done_kappa += new_kappa
    if progress or done:
        log.info(f"certify: gate intervals refined at {len(done)} threshold(s) in {rounds} round(s), "
                 f"{redone} input(s) redone")
    listed = [t[0] if n == 1 else list(t) for t in sorted(done)]
    return {"thresholds": listed, "class_thresholds": [list(k) for k in done_kappa], "inputs_redone": redone,
            "rounds": rounds}


ATTACK_DEFAULTS = {"steps": 15, "restarts": 3, "step_size": 0.5, "decay_at": [0.5, 0.75], "first_step": None,
                   "loss": "margin", "push": 1.0, "margin": 0.05, "certified_sample": 200, "seed": 0,
                   "batch_size": 1024, "net_batch_size": 256}


def _attack_rows(model: ACEModel, loader: DataLoader, rows: np.ndarray, row_of: Mapping[int, int], eps: float,
                 attack: Mapping[str, Any], what: str, thresholds: Optional[Sequence[float]] = None,
                 reachable: Optional[np.ndarray] = None, progress: bool = True,
                 candidates: Sequence[Mapping[int, torch.Tensor]] = (), label: Optional[str] = None
                 ) -> tuple[np.ndarray, dict[int, torch.Tensor]]:
    """Adversarial correctness of the records' ``rows`` (bool per row, in ``rows`` order) against
    one network alone (``what`` = 'core' | 'cert') or the composed model at ``thresholds``, and
    the adversarial point of every broken row (row -> image). Only those rows' images are
    attacked, gathered into chunks of ``attack.batch_size`` for the composed model (its pruned
    attack soon holds few inputs: large chunks keep the per-step overhead low) and
    ``attack.net_batch_size`` for a single net (little overhead per step; a conv net's passes cost
    less per input in smaller batches on a CPU); ``reachable`` [rows, n + 1] restricts
    the composed attack to the branches that can answer each input; ``candidates`` (row -> image,
    e.g. the single nets' adversarial points) are checked on the composed model before attacking.
    The random restarts come from a generator seeded with ``attack.seed`` for this attack alone."""
    from ace_lightning.attacks import pgd_pruned
    from ace_lightning.attacks.composed import attack_composed

    wanted = {int(r): k for k, r in enumerate(rows)}
    out = np.zeros(len(rows), dtype=bool)
    points: dict[int, torch.Tensor] = {}
    if not len(rows):
        return out, points
    kw = dict(steps=int(attack["steps"]), restarts=int(attack["restarts"]), step_size=float(attack["step_size"]),
              decay_at=tuple(attack.get("decay_at") or ()), first_step=attack.get("first_step"),
              loss=str(attack["loss"]))
    single = what in ("core", "cert")
    chunk = max(1, int(attack.get("net_batch_size" if single else "batch_size") or (256 if single else 1024)))
    generator = None

    def run(xs: list, ys: list, ks: list) -> None:
        nonlocal generator
        xb, yb, k = torch.cat(xs), torch.cat(ys), torch.cat(ks).numpy()
        if generator is None:
            generator = torch.Generator(device=xb.device).manual_seed(int(attack.get("seed") or 0))
        if single:
            net = model.core if what == "core" else model.certs[0]
            ok, x_adv = pgd_pruned(net, xb, yb, eps, generator=generator, **kw)
        else:
            reach = None if reachable is None else torch.as_tensor(reachable[k])
            starts = [torch.stack([c.get(int(rows[j]), xb[i]) for i, j in enumerate(k)]) for c in candidates]
            ok, x_adv = attack_composed(model, xb, yb, eps, thresholds, push=float(attack["push"]),
                                        margin=float(attack["margin"]), reachable=reach, candidates=starts,
                                        generator=generator, **kw)
        out[k] = ok.cpu().numpy()
        for i in (~ok).nonzero().flatten().tolist():
            points[int(rows[k[i]])] = x_adv[i].detach().cpu()

    label = label or (what if thresholds is None else f"composed T={_ts([thresholds])}")
    xs, ys, ks, held = [], [], [], 0
    for x, y, idx in console.progress(loader, progress, desc=f"attack {label}"):
        pick = [(b, wanted[row_of[int(i)]]) for b, i in enumerate(idx.tolist()) if row_of.get(int(i)) in wanted]
        if not pick:
            continue
        b, k = (torch.as_tensor(v) for v in zip(*pick))
        xs.append(x[b]), ys.append(y[b]), ks.append(k)
        held += len(b)
        if held >= chunk:
            run(xs, ys, ks)
            xs, ys, ks, held = [], [], [], 0
    if held:
        run(xs, ys, ks)
    return out, points


def _with_sample(known: np.ndarray, sample: Optional[int], rng: np.random.Generator,
                 settled: Optional[np.ndarray] = None) -> np.ndarray:
    """Rows to attack: every row neither known robust nor ``settled`` (decided elsewhere), plus
    ``sample`` rows of the known ones (None or < 0: all of them) for the soundness check."""
    open_rows = ~known if settled is None else ~known & ~settled
    unknown, known_rows = np.flatnonzero(open_rows), np.flatnonzero(known)
    if sample is not None and 0 <= int(sample) < len(known_rows):
        known_rows = np.sort(rng.choice(known_rows, size=int(sample), replace=False))
    return np.sort(np.concatenate([unknown, known_rows]))


def attack_test_split(model: ACEModel, loader: DataLoader, test, eps: float, attack: Mapping[str, Any],
                      operating_points: Sequence[Mapping[str, Any]], progress: bool = True,
                      timing: Optional[dict] = None) -> tuple[dict[str, np.ndarray], int]:
    """Adversarial correctness on the test split (per record row): core alone, cert-net alone and
    the composed model at the wanted operating points; returns (key -> bools, soundness
    violations: certified inputs the attack breaks).

    Effort goes where it can matter: an input the records certify is robust if the bounds are
    sound, so only the uncertified inputs plus ``certified_sample`` certified ones (seeded; None:
    all) are attacked, the composed attack skips branches the gate bounds rule out and first
    tries the single nets' adversarial points (an input routed to a branch at that branch's
    adversarial point is broken without a search). Adversarial accuracy counts certified inputs
    as robust, so it stays an upper bound on robust accuracy (certified <= adversarial)."""
    attack = {**ATTACK_DEFAULTS, **dict(attack)}
    sample = attack.get("certified_sample")
    rng = np.random.default_rng(int(attack.get("seed") or 0))  # the certified sample (restarts: per attack)
    index = np.asarray(test["index"], dtype=np.int64)
    row_of = {int(i): r for r, i in enumerate(index)}
    violations = 0
    found: dict[str, dict[int, torch.Tensor]] = {}  # the single nets' adversarial points, per row

    def robust(known: np.ndarray, what: str, thresholds=None, reachable=None,
               settled: Optional[np.ndarray] = None, verdict: Optional[np.ndarray] = None,
               label: Optional[str] = None) -> np.ndarray:
        """Known-robust rows (certified) count as robust; ``settled`` rows take ``verdict`` (the
        single net's attack where the gate bounds fix the branch); the rest and a sample of the
        known ones are attacked."""
        nonlocal violations
        t0 = time.perf_counter()
        rows = _with_sample(known, sample, rng, settled)
        if reachable is not None:  # the soundness sample trusts no bound: every branch, every step
            reachable = reachable.copy()
            reachable[known] = True
        ok, points = _attack_rows(model, loader, rows, row_of, eps, attack, what, thresholds,
                                  None if reachable is None else reachable[rows], progress,
                                  candidates=[found[k] for k in ("core", "cert") if k in found]
                                  if thresholds is not None else (), label=label)
        if thresholds is None:
            found[what] = points
        out = known.copy()
        if settled is not None:
            out = np.where(settled & ~known, verdict, out)
        out[rows] = ok
        violations += int(np.sum(known[rows] & ~ok))
        if timing is not None:
            key = (label or (what if thresholds is None else f"composed T={_ts([thresholds])}")).replace(" ", "_")
            timing[key] = {"seconds": time.perf_counter() - t0, "inputs_attacked": int(len(rows)),
                           "certified_attacked": int(np.sum(known[rows]))}
        return out

    adv = {"core_alone": robust(np.asarray(test.core_ok, dtype=bool), "core"),
           "cert_alone": robust(np.asarray(test.cert_ok[0], dtype=bool), "cert")}
    wanted = attack.get("points") or [p["key"] for p in operating_points]
    by_threshold: dict[Any, np.ndarray] = {}
    for p in operating_points:
        if p["key"] not in wanted:
            continue
        T = [float(t) for t in p["threshold"]] if isinstance(p["threshold"], list) else [float(p["threshold"])]
        kappa = None if p.get("class_thresholds") is None else [float(v) for v in p["class_thresholds"]]
        key = (tuple(T), None if kappa is None else tuple(kappa))
        if key not in by_threshold:  # several operating points often share a threshold
            kap, cls = (None, None) if kappa is None else (np.asarray([kappa]), np.asarray(test["cert_pred"])[None])
            certified = rule.certified_at(test.g, test.lb_g, test.ub_g, T, test.cert_ok, test.core_ok, kap, cls)
            # may each cert-net / the core answer
            reachable = rule.reachable_at(test.g, test.lb_g, test.ub_g, T, kap, cls)
            settled = verdict = None
            if test.cert_ok.shape[0] == 1:  # one pair: where the gate bounds fix the branch on the
                # whole ball, the composed model is that branch there: its own attack decides
                only_cert, only_core = ~reachable[:, 1], ~reachable[:, 0]
                settled = only_cert | only_core
                verdict = np.where(only_cert, adv["cert_alone"], adv["core_alone"])
            with class_thresholds_set(model, kappa):
                by_threshold[key] = robust(certified, "composed", T, reachable, settled, verdict,
                                           label=None if kappa is None else "composed per-class")
        adv[p["key"]] = by_threshold[key]
    return adv, violations


@contextlib.contextmanager
def class_thresholds_set(model: ACEModel, kappa: Optional[Sequence[float]]):
    """Margin selection's class thresholds of pair 1 set to ``kappa`` (None: 0, one T for all
    classes) inside, restored after: the attack runs the model as it would be exported."""
    if model.selection[0] != "margin":
        yield
        return
    saved = model.class_thresholds[0].clone()
    model.set_class_thresholds(0, kappa if kappa is not None else [0.0] * saved.numel())
    try:
        yield
    finally:
        model.class_thresholds[0] = saved


def precision_summary(cols: Mapping[str, np.ndarray], settings: CertifySettings,
                      trainer_precision: Any, refinement: Mapping[str, Any]) -> dict[str, Any]:
    """What the manifest says about arithmetic: the pass's dtype, the re-check tolerance, how many
    inputs float64 decided and how many decisions it changed (per split), certified test inputs
    among the re-checked, and the trainer precision that certification did not use."""
    split = np.asarray(cols["split"]).astype(str)
    rechecked = np.asarray(cols["rechecked"]).astype(bool)
    flipped = np.asarray(cols["recheck_flipped"]).astype(bool)
    certified = np.logical_or.reduce([np.asarray(cols[k]).astype(bool) for k in cols
                                      if k == "cert_ok" or k.startswith("cert_ok_")])  # some cert-net certified
    out: dict[str, Any] = {"dtype": settings.dtype, "recheck_tol": settings.recheck_tol,
                           "trainer_precision_ignored": None if str(trainer_precision) in ("32-true", "32", "None")
                           else str(trainer_precision), "refined_at": refinement}
    for name in np.unique(split):
        m = split == name
        out[name] = {"inputs": int(m.sum()), "rechecked": int((rechecked & m).sum()),
                     "rechecked_cert_ok": int((rechecked & certified & m).sum()),
                     "decisions_changed_by_float64": int((flipped & m).sum())}
    return out


INFERENCE_TIMED = 2048  # test inputs whose plain inference is timed (inference_per_input_ms)


@dataclass
class CertifyJob:
    """What the certify steps share: the run folder's composed model, its data, the settings."""

    cfg: Mapping[str, Any]
    st: dict
    settings: CertifySettings
    eps: float
    run_dir: Path
    stage_dir: Path
    spec: dict
    paths: dict
    ident: dict
    ident_hash: str
    model: Optional[ACEModel] = None
    loaders: Optional[dict] = None
    timing: dict = field(default_factory=dict)
    refinement: dict = field(default_factory=dict)  # refine_at_operating_points' summary
    precision: dict = field(default_factory=dict)   # precision_summary for the manifest
    started: float = field(default_factory=time.perf_counter)

    @property
    def progress(self) -> bool:
        return bool(to_dict(self.cfg["trainer"]).get("enable_progress_bar", True))


def prepare(cfg: Mapping[str, Any]) -> CertifyJob:
    """Validate the certify config and read the run folder's composed model (one-line errors
    before anything is loaded)."""
    st = to_dict(cfg["stage"])
    settings = CertifySettings.from_config(st)
    eps = float(cfg["eps"])
    run_dir = Path(cfg["run_dir"]).resolve()
    selection = st.get("selection", "gate")
    entropy_stage = str(st.get("entropy_stage") or "entropy")
    cascade = st.get("cascade")
    spec, paths = spec_from_run(run_dir, selection, entropy_stage, cascade)
    data_name = to_dict(cfg["data"])["name"]
    if data_name != spec["data"]["name"]:
        raise ConfigError(f"records would come from dataset '{data_name}' but {run_dir} was trained on "
                          f"'{spec['data']['name']}': pass data={spec['data']['name']}")
    ident = {"spec": spec, "weights": {k: sha256_file(p) for k, p in paths.items()}, "eps": eps, "stage": st,
             "data": {k: v for k, v in to_dict(cfg["data"]).items() if k not in ("num_workers", "download", "data_dir")}}
    return CertifyJob(cfg, st, settings, eps, run_dir, run_dir / certify_folder(selection, entropy_stage, cascade),
                      spec, paths, ident, config_hash(ident))


def certify_records(job: CertifyJob) -> Optional[Path]:
    """Step 1: certify every input of the splits (DDP shards them), refine the gate intervals at
    the operating points, write records.csv; returns its path (None on non-zero ranks)."""
    st, settings = job.st, job.settings
    job.model = load_model(job.spec, job.paths)
    dm = datamodule_from(job.cfg)
    batch_size = int(st.get("batch_size", 256))
    job.loaders = _loaders(dm, st.get("splits", list(SPLITS)), batch_size)
    trainer_cfg = {k: v for k, v in to_dict(job.cfg["trainer"]).items()
                   if k in ("accelerator", "devices", "strategy", "enable_progress_bar")}
    precision = to_dict(job.cfg["trainer"]).get("precision", "32-true")
    if str(precision) not in ("32-true", "32", "None"):
        rank_zero_warn(f"certify runs in full precision ({settings.dtype}); trainer.precision={precision} "
                      f"applies to training only")
    job.stage_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()  # plain inference of the composed model (what certification costs against),
    timed = 0                 # on the first INFERENCE_TIMED test inputs
    with torch.no_grad():
        for x, _, _ in job.loaders["test"]:
            job.model(x)
            timed += x.shape[0]
            if timed >= INFERENCE_TIMED:
                break
    job.timing["plain_inference_test"] = time.perf_counter() - t0
    job.timing["plain_inference_inputs"] = timed
    t0 = time.perf_counter()
    cols = compute_records(job.model, job.loaders, job.eps, settings, trainer_cfg, work_dir=job.stage_dir)
    job.timing["certification_all_splits"] = time.perf_counter() - t0
    if cols is None:  # non-zero DDP rank: rank 0 does the rest
        return None
    t0 = time.perf_counter()
    job.refinement = refine_at_operating_points(job.model, job.loaders, cols, job.eps, settings,
                                                st.get("thresholds"), st.get("grid", 101),
                                                float(st.get("tolerance", 0.01)), batch_size, job.progress)
    job.timing["refinement"] = time.perf_counter() - t0
    job.precision = precision_summary(cols, settings, precision, job.refinement)
    job.timing["certification_per_input_ms"] = 1000 * job.timing["certification_all_splits"] / max(1, len(cols["index"]))
    job.timing["inference_per_input_ms"] = 1000 * job.timing["plain_inference_test"] / max(1, timed)
    return write_records(cols, job.stage_dir)


def sweep_and_report(records_path: Path, stage_dir: Path, grid: Any = 101, tolerance: float = 0.01) -> dict:
    """Step 2: the exact threshold sweep on val and test, operating points chosen on val,
    sweep_*.csv, operating_points.json and pareto.png; returns report.write_sweep_outputs' dict."""
    from ace_lightning.report import write_sweep_outputs

    return write_sweep_outputs(records_path, stage_dir, grid=grid, tolerance=tolerance)


def attack_and_check(model: ACEModel, loader: DataLoader, records_path: Path, stage_dir: Path, eps: float,
                     attack: Mapping[str, Any], points: Sequence[dict], progress: bool = True) -> int:
    """Step 3: attack the test split (single nets, the composed model at the operating points),
    add adv_acc to ``points`` and operating_points.json; raises SoundnessError if the attack
    breaks an input the records certify. Returns the number of such inputs (0)."""
    from ace_lightning.sweep import load_records

    summary = json.loads((stage_dir / "operating_points.json").read_text())
    attack_timing: dict = {}
    adv, violations = attack_test_split(model, loader, load_records(records_path, split="test"), eps, attack,
                                        summary["operating_points"], progress, attack_timing)
    for p in points:
        if p["key"] in adv:
            p["adv_acc"] = float(np.mean(adv[p["key"]]))
    for group in ("reference_points", "operating_points"):
        for p in summary[group]:
            if p["key"] in adv and "test" in p:
                p["test"]["adv_acc"] = float(np.mean(adv[p["key"]]))
    summary["attack"] = dict(attack)
    summary["attack_timing_s"] = attack_timing
    summary["soundness_violations"] = violations
    atomic_write_text(stage_dir / "operating_points.json", json.dumps(summary, indent=2))
    if violations:
        raise SoundnessError(f"SOUNDNESS BUG: {violations} certified test input(s) broken by the attack "
                             f"(see {stage_dir}/operating_points.json)")
    return violations


def export_composed(job: CertifyJob, points: Sequence[dict], operating_point: Optional[str] = None) -> dict:
    """Step 4: the composed model at the chosen operating point (ace_model.pt, certifying as the
    stage did), table.txt and the manifest."""
    stage_dir = job.stage_dir
    summary = json.loads((stage_dir / "operating_points.json").read_text())
    if operating_point is None:  # margin selection: its per-class point when there is one
        keys = {p["key"] for p in summary["operating_points"]}
        operating_point = "per_class" if job.model.selection[0] == "margin" and "per_class" in keys \
            else "nat_within_1pt"
    chosen = next((p for p in summary["operating_points"] if p["key"] == operating_point), None)
    if chosen is None and summary["operating_points"]:
        chosen = summary["operating_points"][0]
    spec = job.spec
    if chosen is not None:
        T = chosen["threshold"] if isinstance(chosen["threshold"], list) else [chosen["threshold"]]
        T = [float(t) for t in T]
        job.model.set_thresholds(T)
        for branch, t in zip(spec["branches"], T):
            branch["threshold"] = t
        if chosen.get("class_thresholds") is not None:  # margin selection: one kappa per class
            kappa = [float(v) for v in chosen["class_thresholds"]]
            job.model.set_class_thresholds(0, kappa)
            spec["branches"][0]["class_thresholds"] = kappa
    spec["certify"] = job.settings.as_dict()  # ACEModel.predict(eps=) certifies the same way
    job.model.spec = spec
    job.model.save(stage_dir / "ace_model.pt")
    n_test = len(job.loaders["test"].dataset)
    table = format_table(points, title=f"{spec['data']['name']}, eps={job.eps:g}, test split ({n_test} inputs)")
    atomic_write_text(stage_dir / "table.txt", table + "\n")
    log.info(table)
    parquet = stage_dir / "records.parquet"
    return write_manifest(stage_dir, {
        "stage": "certify", "status": "complete", "config_hash": job.ident_hash, "config": job.ident,
        "eps": job.eps, "selection": job.st.get("selection", "gate"),
        "outputs": {"records": "records.csv", **({"records_parquet": parquet.name} if parquet.is_file() else {}),
                    "sweep_val": "sweep_val.csv", "sweep_test": "sweep_test.csv",
                    "operating_points": "operating_points.json", "pareto": "pareto.png",
                    "table": "table.txt", "model": {"path": "ace_model.pt",
                                                    "sha256": sha256_file(stage_dir / "ace_model.pt")}},
        "chosen_operating_point": chosen,
        "certification": job.settings.as_dict(),
        "precision": job.precision,
        "timing_s": dict(job.timing),
        "metrics": {p["key"]: {k: v for k, v in p.items() if k not in ("key", "name")} for p in points},
        "soundness_violations": summary.get("soundness_violations", 0),
        "wall_s": time.perf_counter() - job.started,
    })


def run_certify(cfg: Mapping[str, Any]) -> dict:
    """The certify stage (conf/stage/certify.yaml): records -> sweep/report -> attack -> export,
    skipped when the run folder already holds a complete certification of the same inputs."""
    job = prepare(cfg)
    done = read_manifest(job.stage_dir)
    if done and done.get("status") == "complete" and done.get("config_hash") == job.ident_hash \
            and not cfg.get("overwrite"):
        log.info(f"stage 'certify' already complete in {job.stage_dir} (same inputs): skipped")
        return done
    job.started = time.perf_counter()
    records_path = certify_records(job)
    if records_path is None:
        return {}
    st = job.st
    t0 = time.perf_counter()
    written = sweep_and_report(records_path, job.stage_dir, st.get("grid", 101), float(st.get("tolerance", 0.01)))
    job.timing["sweep_and_report"] = time.perf_counter() - t0
    points = written["points"]
    attack = {**ATTACK_DEFAULTS, **dict(st.get("attack") or {})}
    if attack.get("enabled", True):
        t0 = time.perf_counter()
        attack_and_check(job.model, job.loaders["test"], records_path, job.stage_dir, job.eps, attack, points,
                         job.progress)
        job.timing["attack"] = time.perf_counter() - t0
    manifest = export_composed(job, points, st.get("operating_point"))
    from ace_lightning.summary import write_summary

    write_summary(Path(cfg["runs_root"]).resolve())
    log_to_wandb(cfg, job.stage_dir, points)
    return manifest


def log_to_wandb(cfg: Mapping[str, Any], stage_dir: Path, points: Sequence[Mapping[str, Any]]) -> None:
    """The certify run of the pipeline's wandb group (offline unless the user opted in): its
    config is the job's plus what a dashboard filters by (loggers.run_identity: dataset, eps,
    seed, method, selection); the records' summary per operating point (the table's rows, as a
    wandb Table and as summary values ``<point>/<metric>``), the sweep as Tables, the Pareto plot."""
    import csv
    import math

    from omegaconf import DictConfig, OmegaConf

    from ace_lightning.loggers import run_identity, wandb_mode, wandb_settings

    wb = wandb_settings(cfg)
    mode = wandb_mode(wb)
    if mode is None:
        return
    import wandb

    config = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    config.update(run_identity(cfg, stage_dir.name, read_manifest(stage_dir.parent / "cert")))
    group = str(wb.get("group") or stage_dir.parent.name)
    run = wandb.init(project=wb.get("project", "ace-lightning"), entity=wb.get("entity"), group=group,
                     name=f"{group}/{stage_dir.name}", job_type="certify", dir=str(stage_dir), mode=mode,
                     reinit="finish_previous", config=config)
    metrics = ("nat_acc", "cert_acc", "adv_acc", "cert_route_rate")
    try:
        for split in ("val", "test"):
            path = stage_dir / f"sweep_{split}.csv"
            if path.is_file():
                with open(path, newline="") as fh:
                    rows = list(csv.reader(fh))
                run.log({f"sweep/{split}": wandb.Table(columns=rows[0], data=[[float(v) for v in r] for r in rows[1:]])})

        def number(v: Any) -> Any:  # +-inf thresholds (core / cert-net alone) as text: JSON has no inf
            return str(v) if isinstance(v, float) and not math.isfinite(v) else v
        run.log({"operating_points": wandb.Table(
            columns=["point", "name", "threshold", *metrics], allow_mixed_types=True,
            data=[[p["key"], p.get("name"), number(p.get("threshold")), *[p.get(k) for k in metrics]] for p in points])})
        run.log({"pareto": wandb.Image(str(stage_dir / "pareto.png"))})
        for p in points:
            for k in metrics:
                if isinstance(p.get(k), (int, float)):
                    run.summary[f"{p['key']}/{k}"] = p[k]
    finally:
        run.finish()
