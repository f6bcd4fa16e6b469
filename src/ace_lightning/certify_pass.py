"""The certification pass of the certify stage: every input of the splits -> one record
(docs/METHOD.md section 4.5), refined at the thresholds the report and the export will use.

T enters no bound, so one pass that stores (core_correct, cert_correct, cert_ok, core_ok, g, lb_g,
ub_g) per input gives the natural-vs-certified curve for every threshold (sweep.py); the reference
code re-certified for every T. Certificates take the best of several bound methods per input (an
IBP-trained net is often certified more often by IBP than by CROWN): cert_ok is the OR over
methods, the gate interval the intersection of the (sound) intervals.

Runs in Lightning's predict loop, so ``trainer=ddp`` shards the inputs over ranks; each rank writes
its shard and rank 0 merges them (deduplicated by index); the records' layout and files:
ace_lightning.records.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, Dataset

from ace_lightning import console
from ace_lightning.ace import ACEModel, CertifySettings, certify_batch
from ace_lightning.console import log
from ace_lightning.errors import ConfigError
from ace_lightning.records import method_codes, pair_suffixes, record_columns

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

    sfx = pair_suffixes(model.num_branches)
    want = np.zeros(len(cols["index"]), dtype=bool)
    for i, s in enumerate(sfx):
        lb, ub = torch.as_tensor(cols[f"lb_g{s}"]), torch.as_tensor(cols[f"ub_g{s}"])
        ts = sorted({float(t[i]) for t in thresholds})
        margin = model.selector(i).per_class
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
    code_of = method_codes()  # the tightness order of the records' method names
    chunks = [rows[start:start + batch_size] for start in range(0, rows.size, batch_size)]
    at = " and ".join(([f"T={thresholds_text(thresholds)}"] if thresholds else [])
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
            old_method = np.array([code_of.get(str(m), -1) for m in cols[method][chunk]])
            new_method = np.array([code_of.get(str(m), -1) for m in new[method]])
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


def thresholds_text(thresholds: Sequence[Sequence[float]]) -> str:
    return ",".join("(" + ",".join(f"{v:.4g}" for v in t) + ")" if len(t) > 1 else f"{t[0]:.4g}"
                    for t in thresholds) or "-"


def split_loaders(dm, splits: Sequence[str], batch_size: int) -> dict[str, DataLoader]:
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
    from ace_lightning.operating import val_class_thresholds, val_operating_thresholds

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
        kappa = val_class_thresholds(cols, tolerance) if n == 1 and model.selector(0).per_class else None
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
