"""An independent check of a run folder's certificates: ``ace-certify action=audit run_dir=...``
(docs/METHOD.md section 13).

The certify stage's records claim, per input, bounds over the ball: a certified margin of the
cert-net, an interval [lb_g, ub_g] of the selector; ace_model.pt answers at its exported
thresholds. A user who did not write the bound code re-checks those claims here with tools that
share no code with it:

(a) the reference bounds (bounds/reference.py: pure torch, dense, float64, no auto_LiRPA)
    recompute every certificate the composed model relies on, with the method the records say
    decided it, and the gate intervals that decide routing at the exported threshold;
(b) attacks on every certified input: on each bound itself (a point below a certified margin or
    outside the recorded gate interval) and on the composed model as deployed; AutoAttack too
    when it is installed;
(c) an exact MILP (bounds/milp.py) on a sample: the true minimum margin against the certified one.

Only a concrete point that contradicts a record is a *violation* (exit code 1): the attacks and
the MILP give such points. A certificate the reference does not reproduce is *unconfirmed* and
listed with its index: a sound bound can be tighter than the reference (alpha-CROWN), so that
alone proves nothing. Everything is written to <certify folder>/audit.json.
"""
from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ace_lightning import rule
from ace_lightning.ace import ACEModel
from ace_lightning.atomic import atomic_write_text
from ace_lightning.console import log, progress
from ace_lightning.errors import ConfigError, InputNotFoundError, StageInputError

AUDIT_FILE = "audit.json"
LISTED = 100  # entries per list in audit.json (counts are always complete)
# the reference method that recomputes a recorded method (alpha-CROWN: CROWN, looser, may not confirm)
REFERENCE_OF = {"IBP": "IBP", "CROWN-IBP": "CROWN-IBP", "CROWN": "CROWN", "alpha-CROWN": "CROWN"}
CROWN_BATCH = 4  # inputs per dense full-CROWN pass (its intermediate matrices are n_k x n_in per input)


@dataclass(frozen=True)
class AuditSettings:
    """The audit's knobs (conf/certify.yaml, ``audit:``; validated in one place)."""

    split: str = "test"
    steps: int = 40
    restarts: int = 3
    step_size: float = 0.25
    decay_at: tuple = (0.5, 0.75)
    composed: bool = True
    batch_size: int = 1024
    seed: int = 0
    tol: float = 1e-4
    reference: bool = True
    reference_tol: float = 1e-9
    reference_batch_size: int = 256
    reference_max_entries: int = 50_000_000
    autoattack: str = "auto"
    autoattack_attacks: tuple = ("apgd-ce", "apgd-t")
    milp_sample: int = 10
    milp_time_limit_s: float = 30.0
    milp_max_unstable: int = 400
    stage: Optional[str] = None
    data_dir: Optional[str] = None
    progress: bool = True

    def __post_init__(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ConfigError(f"audit: {what}")
        need(self.split in ("val", "test"), f"split must be val or test, got {self.split!r}")
        need(int(self.steps) >= 1 and int(self.restarts) >= 1,
             f"steps and restarts must be >= 1, got {self.steps} and {self.restarts}")
        need(float(self.step_size) > 0, f"step_size must be > 0 (relative to eps), got {self.step_size}")
        need(all(0 < float(f) < 1 for f in self.decay_at), f"decay_at: fractions in (0, 1), got {list(self.decay_at)}")
        need(int(self.batch_size) >= 1 and int(self.reference_batch_size) >= 1, "batch sizes must be >= 1")
        need(float(self.tol) >= 0 and float(self.reference_tol) >= 0, "tol and reference_tol must be >= 0")
        need(int(self.reference_max_entries) >= 1, "reference_max_entries must be >= 1")
        need(self.autoattack in ("auto", "off"), f"autoattack must be auto or off, got {self.autoattack!r}")
        need(int(self.milp_sample) >= 0, f"milp_sample must be >= 0 (0: no MILP), got {self.milp_sample}")
        need(float(self.milp_time_limit_s) > 0 and int(self.milp_max_unstable) >= 0,
             "milp_time_limit_s must be > 0 and milp_max_unstable >= 0")

    @classmethod
    def from_config(cls, cfg: Optional[Mapping[str, Any]]) -> "AuditSettings":
        kw = {k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in dict(cfg or {}).items()
              if k in cls.__dataclass_fields__ and v is not None}
        unknown = sorted(set(dict(cfg or {})) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"audit: unknown knob(s) {', '.join(unknown)}; known: {', '.join(cls.__dataclass_fields__)}")
        if isinstance(kw.get("autoattack"), bool):
            kw["autoattack"] = "auto" if kw["autoattack"] else "off"
        return cls(**kw)

    def as_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


# -- the run folder --------------------------------------------------------------------------------

def certified_folders(run_dir: Path, stage: Optional[str] = None) -> list[Path]:
    """The complete certify stage folders of ``run_dir`` (certify/ first; folders moved aside as
    <stage>.old-<time> are not audited), or the one named ``stage``; one-line errors otherwise."""
    from ace_lightning.compare import certified_folders as with_sweeps
    from ace_lightning.rundir import read_manifest

    run_dir = Path(run_dir).expanduser().resolve()
    if not run_dir.is_dir():
        raise InputNotFoundError(f"run folder not found: {run_dir}")
    if stage:
        folder = run_dir / stage
        manifest = read_manifest(folder) if folder.is_dir() else None
        if not manifest or manifest.get("status") != "complete" or manifest.get("stage") != "certify":
            raise StageInputError(f"{folder} is not a complete certify stage: run action=certify first")
        return [folder]
    found = [p for p in with_sweeps(run_dir) if ".old-" not in p.name
             and (read_manifest(p) or {}).get("status") == "complete" and (p / "ace_model.pt").is_file()]
    if not found:
        raise StageInputError(f"{run_dir} has no complete certify stage to audit: run action=certify first")
    return found


def _stage_files(stage_dir: Path) -> tuple[dict, Path]:
    """The certify manifest and the records file, with the exported model checked against the
    sha256 the manifest recorded (the records describe that model and no other)."""
    from ace_lightning.rundir import read_manifest, sha256_file

    manifest = read_manifest(stage_dir) or {}
    if manifest.get("status") != "complete":
        raise StageInputError(f"{stage_dir} is not a complete certify stage: run action=certify first")
    for name in ("ace_model.pt", "records.csv", "operating_points.json"):
        if not (stage_dir / name).is_file():
            raise StageInputError(f"{stage_dir} lacks {name}: run action=certify again (overwrite=true)")
    want = ((manifest.get("outputs") or {}).get("model") or {}).get("sha256")
    if want and sha256_file(stage_dir / "ace_model.pt") != want:
        raise StageInputError(f"{stage_dir / 'ace_model.pt'} changed after the certify stage wrote it (sha256 differs "
                              f"from its manifest): the records describe another model; certify again")
    return manifest, stage_dir / "records.csv"


def audit_inputs(manifest: Mapping[str, Any], records, split: str, data_dir: Optional[str] = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The images the records index (records' ``index``: position in the split's dataset), from
    the data the certify stage ran on (its manifest's data settings: the same splits); checked
    against the records' labels."""
    from ace_lightning.rundir import stage_datamodule

    dm = stage_datamodule(manifest, data_dir)
    dm.setup("test")
    base = (dm.test_set if split == "test" else dm.val_set).dataset
    index = np.asarray(records["index"]).astype(np.int64)
    if index.size and (index.min() < 0 or index.max() >= len(base)):
        raise StageInputError(f"records index inputs up to {int(index.max())}, the {split} split of "
                              f"{dm.name} has {len(base)}: not the data the records were made on")
    items = [base[int(i)] for i in index]
    x = torch.stack([torch.as_tensor(it[0], dtype=torch.float32) for it in items])
    y = torch.as_tensor([int(it[1]) for it in items])
    if "label" in records:
        bad = np.flatnonzero(y.numpy() != np.asarray(records["label"]).astype(np.int64))
        if bad.size:
            raise StageInputError(f"the {split} input with index {int(index[bad[0]])} has label {int(y[bad[0]])} in "
                                  f"{dm.data_dir}, {int(records['label'][bad[0]])} in the records: not the data "
                                  f"the records were made on (pass data_dir=...)")
    return x, y


@dataclass
class Claims:
    """What the records claim at the exported thresholds, as arrays over the split's inputs:
    g/lb/ub/cert_ok/cert_margin [n, N], core_ok [N], certified [N] and, per certified input, which
    branches may answer somewhere on the ball (reachable [N, n + 1])."""

    index: np.ndarray
    thresholds: np.ndarray
    g: np.ndarray
    lb: np.ndarray
    ub: np.ndarray
    cert_ok: np.ndarray
    cert_correct: np.ndarray
    cert_margin: np.ndarray
    cert_method: list
    gate_method: list
    core_ok: np.ndarray
    kappa: Optional[np.ndarray] = None  # margin selection's class thresholds [n, K] (NaN rows: other pairs)
    cls: Optional[np.ndarray] = None    # the cert-net's class at x [n, N] (what kappa is picked by)
    certified: np.ndarray = field(init=False)
    reachable: np.ndarray = field(init=False)
    t_lb: np.ndarray = field(init=False)  # per pair and input: "surely fires" iff lb >= t_lb
    t_ub: np.ndarray = field(init=False)  # ... "may fire" iff ub >= t_ub

    def __post_init__(self) -> None:
        self.certified = self.rule(self.g, self.lb, self.ub, self.cert_ok, self.core_ok)
        self.reachable = rule.reachable_at(self.g, self.lb, self.ub, self.thresholds, self.kappa, self.cls)
        _, self.t_lb, self.t_ub = rule.per_input_thresholds(self.thresholds, len(self.index), self.kappa, self.cls,
                                                             self.lb)

    def rule(self, g, lb, ub, cert_ok, core_ok) -> np.ndarray:
        """The certification rule (4.3) at the exported thresholds on other bounds."""
        return rule.certified_at(g, lb, ub, self.thresholds, cert_ok, core_ok, self.kappa, self.cls)

    def reachable_with(self, g, lb, ub) -> np.ndarray:
        return rule.reachable_at(g, lb, ub, self.thresholds, self.kappa, self.cls)

    @property
    def n_pairs(self) -> int:
        return self.g.shape[0]

    def fires(self, k: int) -> np.ndarray:
        """Certified inputs whose certificate uses "gate k fires on the whole ball" (lb_g >= T)."""
        return self.certified & self.reachable[:, k] & rule.decided(self.g[k], self.lb[k], self.ub[k]) \
            & (self.lb[k] >= self.t_lb[k])

    def silent(self, k: int) -> np.ndarray:
        """... uses "gate k stays below T on the whole ball" (ub_g < T)."""
        return self.certified & self.reachable[:, k] & rule.decided(self.g[k], self.lb[k], self.ub[k]) \
            & (self.ub[k] < self.t_ub[k])


def read_claims(records, thresholds: np.ndarray, kappa: Optional[np.ndarray] = None) -> Claims:
    """The claims of sweep.Records at ``thresholds`` (records without cert_margin claim a margin
    above 0 for every certified input: the least a certificate says)."""
    col = records.pair_column
    pairs = list(records.pairs)
    text = lambda name: [np.asarray(records[col(name, i)]).astype(str) if col(name, i) in records  # noqa: E731
                         else np.full(len(records), "none") for i in pairs]
    margin = np.stack([np.asarray(records[col("cert_margin", i)], dtype=np.float64) if col("cert_margin", i) in records
                       else np.zeros(len(records)) for i in pairs])
    cls = None
    if kappa is not None:
        cls = np.stack([np.asarray(records[col("cert_pred", i)]).astype(np.int64) for i in pairs])
    return Claims(np.asarray(records["index"]).astype(np.int64), thresholds, records.g, records.lb_g, records.ub_g,
                  records.cert_ok, records.cert_correct, margin, text("cert_method"), text("gate_method"),
                  records.core_ok, kappa, cls)


def class_thresholds(model: ACEModel) -> Optional[np.ndarray]:
    """Margin selection's per-class thresholds kappa [n, K] of the exported model, None without."""
    kappa = getattr(model, "class_thresholds", None)
    if kappa is None or bool(torch.isnan(kappa).all()):
        return None
    return kappa.double().numpy()


def recorded_selector(model: ACEModel, k: int, z: torch.Tensor, logits: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The selector quantity the records bound (g, lb_g, ub_g): g_k itself, except for margin
    selection, whose records hold the cert-net's top-1 minus top-2 gap while the model fires at
    gap - kappa_c >= T (ACEModel.gate_value subtracts the predicted class's kappa)."""
    if model.selection[k] != "margin":
        return model.gate_value(k, z, logits)
    logits = model.certs[k](z) if logits is None else logits
    value = model.gate_value(k, z, logits)
    return value + model.class_thresholds[k].to(value)[logits.argmax(-1)]


# -- small helpers ----------------------------------------------------------------------------------

def _slack(bound: np.ndarray, tol: float) -> np.ndarray:
    return tol * (1.0 + np.abs(bound))


def _listed(entries: list) -> list:
    return entries[:LISTED]


def _margin_spec(y: torch.Tensor, k: int, dtype=torch.float64) -> torch.Tensor:
    """C [B, K-1, K] with rows e_y - e_j (j != y)."""
    eye = torch.eye(k, dtype=dtype)
    c = eye[y].unsqueeze(1) - eye.unsqueeze(0)
    keep = torch.arange(k).unsqueeze(0) != y.unsqueeze(1)
    return c[keep].view(y.shape[0], k - 1, k)


def min_margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """min_{j != y} z_y - z_j per input (negative: misclassified): the attacks' margin loss, negated."""
    from ace_lightning.attacks.pgd import margin_loss

    return -margin_loss(logits, y)


def reference_problem(net: nn.Module, x: torch.Tensor, max_entries: int) -> Optional[str]:
    """None if the reference can bound ``net`` on inputs shaped like ``x``, else why not: a layer
    it does not model, or a dense matrix larger than ``max_entries`` (a big conv net)."""
    from ace_lightning.bounds.reference import supported

    why = supported(net)
    if why:
        return why
    sizes: list[int] = []
    hooks = [m.register_forward_hook(lambda m, i, o: sizes.append(i[0][0].numel() * o[0].numel()))
             for m in net.modules() if not list(m.children())]
    with torch.no_grad():
        net(x[:1])
    for h in hooks:
        h.remove()
    if sizes and max(sizes) > max_entries:
        return (f"a layer's dense matrix would have {max(sizes):,} entries > reference_max_entries="
                f"{max_entries:,}: too large for the dense reference")
    return None


def _batches(rows: np.ndarray, size: int) -> list[np.ndarray]:
    return [rows[i:i + size] for i in range(0, len(rows), size)]


def _progress(items: Sequence, show: bool, desc: str) -> Sequence:
    """console.progress for work that exists (an empty loop is not announced)."""
    return progress(items, show, desc=desc) if len(items) else items


def _ref_fn(method: str) -> Callable:
    from ace_lightning.bounds import reference

    return {"IBP": reference.ibp, "CROWN-IBP": reference.crown_ibp, "CROWN": reference.crown}[method]


# -- (a) the reference bounds ----------------------------------------------------------------------

def _reference_margins(steps, x: torch.Tensor, y: torch.Tensor, eps: float, methods: np.ndarray,
                       batch: int, show: bool, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(min_j reference lower bound of z_y - z_j over the ball, prediction at x == y) per input,
    each with its reference method (IBP, CROWN-IBP or CROWN), float64."""
    from ace_lightning.bounds.reference import affine_forward

    out = np.full(len(y), np.nan)
    correct = np.zeros(len(y), bool)
    k = None
    for method in ("IBP", "CROWN-IBP", "CROWN"):
        rows = np.flatnonzero(methods == method)
        size = batch if method != "CROWN" else CROWN_BATCH
        for part in _progress(_batches(rows, size), show, f"audit reference {method} ({what})"):
            xs = x[torch.as_tensor(part)].double()
            with torch.no_grad():
                logits = affine_forward(steps, xs).flatten(1)
            k = logits.shape[1]
            ys = y[torch.as_tensor(part)]
            correct[part] = (logits.argmax(-1) == ys).numpy()
            lo, hi = (xs - eps).clamp(0, 1), (xs + eps).clamp(0, 1)
            lb, _ = _ref_fn(method)(steps, lo, hi, C=_margin_spec(ys, k))
            out[part] = lb.min(dim=1).values.numpy()
    return out, correct


def _reference_interval(steps, x: torch.Tensor, eps: float, methods: list[tuple[str, ...]], batch: int,
                        show: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(g at x, lb, ub) of a one-logit selector net per input: the intersection of the reference
    intervals of that input's methods, float64."""
    from ace_lightning.bounds.reference import affine_forward

    n = x.shape[0]
    g, lb, ub = np.full(n, np.nan), np.full(n, -np.inf), np.full(n, np.inf)
    for method in ("IBP", "CROWN-IBP", "CROWN"):
        rows = np.flatnonzero([method in m for m in methods])
        size = batch if method != "CROWN" else CROWN_BATCH
        for part in _progress(_batches(rows, size), show, f"audit reference {method} (gate)"):
            xs = x[torch.as_tensor(part)].double()
            lo, hi = (xs - eps).clamp(0, 1), (xs + eps).clamp(0, 1)
            l, u = _ref_fn(method)(steps, lo, hi)
            with torch.no_grad():
                g[part] = affine_forward(steps, xs).flatten(1)[:, 0].numpy()
            lb[part] = np.maximum(lb[part], l.flatten(1)[:, 0].numpy())
            ub[part] = np.minimum(ub[part], u.flatten(1)[:, 0].numpy())
    return g, lb, ub


def _gate_methods_used(recorded: str, certification: Mapping[str, Any]) -> tuple[str, ...]:
    """The reference methods whose intersection recomputes a recorded gate interval: every
    gate method, and the refine methods up to the recorded one (its ``gate_method``)."""
    base = list(certification.get("gate_methods") or ["IBP", "CROWN-IBP"])
    refine = list(certification.get("refine_methods") or [])
    used = base + (refine[:refine.index(recorded) + 1] if recorded in refine else [])
    return tuple(sorted({REFERENCE_OF[m] for m in used if m in REFERENCE_OF}))


def reference_check(model: ACEModel, x: torch.Tensor, y: torch.Tensor, claims: Claims, eps: float,
                    certification: Mapping[str, Any], s: AuditSettings) -> tuple[dict, np.ndarray]:
    """(a): every certificate the composed model relies on at its thresholds, recomputed with the
    reference bounds (the method the records name; alpha-CROWN by CROWN), then the whole rule on
    the reference's bounds. Unconfirmed inputs are listed; none of this is a violation. Also
    returns which branches may answer each input by the reference's own gate intervals, widened
    by ``tol`` ([N, n + 1]; a gate the reference did not bound may fire anywhere): the branches the
    composed attack must try, ruled out by a bound that shares no code with the records'."""
    from ace_lightning.bounds.reference import affine_layers

    t0 = time.perf_counter()
    n = claims.n_pairs
    tol = float(s.reference_tol)
    cert_ok, g, lb, ub = claims.cert_ok.copy(), claims.g.copy(), claims.lb.copy(), claims.ub.copy()
    core_ok = claims.core_ok.copy()
    out: dict[str, Any] = {"ran": True, "tol": tol, "pairs": [], "notes": []}
    wide_lb, wide_ub = np.full_like(claims.lb, -np.inf), np.full_like(claims.ub, np.inf)
    for k in range(n):
        pair: dict[str, Any] = {}
        rows = np.flatnonzero(claims.certified & claims.reachable[:, k])  # they need cert_ok_k
        net = model.certs[k]
        why = reference_problem(net, x, s.reference_max_entries)
        if why:
            pair["cert_net"] = {"skipped": why, "relied_on": int(rows.size)}
            out["notes"].append(f"pair {k + 1}: cert-net certificates taken from the records ({why})")
        else:
            steps = affine_layers(net, x[:1].double())
            recorded = claims.cert_method[k][rows]
            methods = np.array([REFERENCE_OF.get(m, "IBP") for m in recorded])
            ref, correct = _reference_margins(steps, x[torch.as_tensor(rows)] if rows.size else x[:0],
                                              y[torch.as_tensor(rows)] if rows.size else y[:0], eps, methods,
                                              s.reference_batch_size, s.progress, "cert-net")
            confirmed = correct & (ref > -tol)
            cert_ok[k, rows] = confirmed
            by_method = {}
            for m in sorted(set(recorded.tolist())):
                sel = recorded == m
                same = REFERENCE_OF.get(m) == m
                above = claims.cert_margin[k][rows][sel] - ref[sel]  # > 0: the record claims more
                by_method[m] = {"checked": int(sel.sum()), "confirmed": int(confirmed[sel].sum()),
                                "reference": REFERENCE_OF.get(m, "IBP"),
                                "max_abs_diff": float(np.abs(above).max()) if same and above.size else None,
                                "max_recorded_above_reference": float(above.max()) if same and above.size else None}
            pair["cert_net"] = {
                "relied_on": int(rows.size), "confirmed": int(confirmed.sum()),
                "confirmed_strictly": int((correct & (ref > 0)).sum()), "by_method": by_method,
                "unconfirmed": _listed([{"index": int(claims.index[r]), "method": str(recorded[i]),
                                         "recorded": float(claims.cert_margin[k][r]), "reference": float(ref[i]),
                                         "correct_at_x": bool(correct[i])}
                                        for i, r in enumerate(rows) if not confirmed[i]])}
        if model.selection[k] != "gate":
            pair["gate"] = {"skipped": f"{model.selection[k]} selection: its interval comes from the cert-net's "
                                       f"margins (checked above)"}
        else:
            gate = model.gates[str(k)]
            why = reference_problem(gate, x, s.reference_max_entries)
            fires, silent = claims.fires(k), claims.silent(k)
            if why:
                pair["gate"] = {"skipped": why, "relied_on": int((fires | silent).sum())}
                out["notes"].append(f"pair {k + 1}: gate intervals taken from the records ({why})")
            else:
                steps = affine_layers(gate, x[:1].double())
                rows_g = np.flatnonzero(claims.certified)
                used = [_gate_methods_used(m, certification) for m in claims.gate_method[k][rows_g]]
                gx, rl, ru = _reference_interval(steps, x[torch.as_tensor(rows_g)] if rows_g.size else x[:0],
                                                 eps, used, s.reference_batch_size, s.progress)
                T = float(claims.thresholds[k])
                delta = tol * (1 + abs(T))  # the stated tolerance, applied in the records' favour
                g[k, rows_g] = gx
                lb[k, rows_g] = np.minimum(rl + delta, gx)
                ub[k, rows_g] = np.maximum(ru - delta, gx)
                wide_lb[k, rows_g] = rl - _slack(np.full_like(rl, T), s.tol)
                wide_ub[k, rows_g] = ru + _slack(np.full_like(ru, T), s.tol)
                checks = []
                for claim, mask, ok in (("fires", fires, lb[k] >= T), ("silent", silent, ub[k] < T)):
                    sel = mask[rows_g]
                    checks.append((claim, rows_g[sel], ok[rows_g][sel], rl[sel] if claim == "fires" else ru[sel]))
                pair["gate"] = {
                    "relied_on": int(sum(r.size for _, r, _, _ in checks)),
                    "confirmed": int(sum(o.sum() for _, _, o, _ in checks)),
                    "methods": sorted({m for u in used for m in u}),
                    # > 0: the recorded interval is narrower than the reference's on that side
                    "max_recorded_lb_above_reference": float((claims.lb[k][rows_g] - rl).max()) if rows_g.size else None,
                    "max_recorded_ub_below_reference": float((ru - claims.ub[k][rows_g]).max()) if rows_g.size else None,
                    "unconfirmed": _listed([{"index": int(claims.index[r]), "claim": claim, "threshold": T,
                                             "recorded": float((claims.lb if claim == "fires" else claims.ub)[k][r]),
                                             "reference": float(v)}
                                            for claim, rs, oks, vals in checks
                                            for r, ok_r, v in zip(rs, oks, vals) if not ok_r])}
        out["pairs"].append(pair)
    core_rows = np.flatnonzero(claims.certified & claims.reachable[:, n])
    if core_rows.size:
        method = certification.get("core_method")
        why = reference_problem(model.core, x, s.reference_max_entries) if method else \
            "the records certify the core but name no core_method"
        if why:
            out["core"] = {"skipped": why, "relied_on": int(core_rows.size)}
            out["notes"].append(f"core certificates taken from the records ({why})")
        else:
            steps = affine_layers(model.core, x[:1].double())
            ref, correct = _reference_margins(steps, x[torch.as_tensor(core_rows)], y[torch.as_tensor(core_rows)], eps,
                                              np.full(core_rows.size, REFERENCE_OF[method]), s.reference_batch_size,
                                              s.progress, "core")
            core_ok[core_rows] = correct & (ref > -tol)
            out["core"] = {"relied_on": int(core_rows.size), "confirmed": int(core_ok[core_rows].sum())}
    confirmed = claims.rule(g, lb, ub, cert_ok, core_ok)
    rows = np.flatnonzero(claims.certified)
    out["certified"] = int(rows.size)
    out["confirmed"] = int(confirmed[rows].sum())
    out["unconfirmed"] = _listed([int(claims.index[r]) for r in rows if not confirmed[r]])
    out["seconds"] = time.perf_counter() - t0
    return out, claims.reachable_with(g, wide_lb, wide_ub)


# -- (b) the attacks -------------------------------------------------------------------------------

def _minimize(objective, x: torch.Tensor, stop: torch.Tensor, eps: float, s: AuditSettings, generator,
              show: bool, desc: str) -> tuple[torch.Tensor, torch.Tensor]:
    """pgd_minimize over chunks of ``s.batch_size`` inputs (objective(z, idx) with idx into x)."""
    from ace_lightning.attacks.pgd import pgd_minimize

    best, pts = torch.empty(x.shape[0]), x.clone()
    for part in _progress(_batches(np.arange(x.shape[0]), int(s.batch_size)), show, desc):
        sel = torch.as_tensor(part)
        v, p = pgd_minimize(lambda z, idx, sel=sel: objective(z, sel[idx]), x[sel], eps, steps=int(s.steps),
                            step_size=float(s.step_size), restarts=int(s.restarts), decay_at=tuple(s.decay_at),
                            generator=generator, stop_below=stop[sel])
        best[sel], pts[sel] = v.float(), p
    return best, pts


def attack_check(model: ACEModel, x: torch.Tensor, y: torch.Tensor, claims: Claims, eps: float,
                 s: AuditSettings, found_bad: Optional[set] = None, proven: Optional[np.ndarray] = None) -> dict:
    """(b): on every input certified at the exported thresholds, minimise each recorded bound's
    own quantity (the cert-net's smallest margin, the gate value on the side the certificate
    uses) and attack the composed model as deployed, seeded with the points found. A value beyond
    the recorded bound (by more than ``tol`` x (1 + |bound|), the float32 rounding of the
    records) or a wrong answer of the composed model is a violation; the violating inputs'
    indices are added to ``found_bad``. ``proven`` [N, n + 1]: the branches that may answer by the
    reference's bounds (reference_check); the composed attack skips the others (None: none)."""
    found_bad = set() if found_bad is None else found_bad
    from ace_lightning.attacks.composed import attack_composed
    from ace_lightning.attacks.pgd import frozen, pgd_pruned

    t0 = time.perf_counter()
    n = claims.n_pairs
    rows = np.flatnonzero(claims.certified)
    out: dict[str, Any] = {"steps": int(s.steps), "restarts": int(s.restarts), "step_size": float(s.step_size),
                           "loss": "margin", "tol": float(s.tol), "inputs": int(rows.size), "violations": 0,
                           "cert_net": [], "gate": []}
    generator = torch.Generator().manual_seed(int(s.seed))
    candidates = []  # points found by the part attacks, tried first on the composed model

    def wide(net: nn.Module) -> nn.Module:
        return copy.deepcopy(net).double().eval()

    with frozen(model):
        for k in range(n):
            net, net64 = model.certs[k], wide(model.certs[k])
            sel = np.flatnonzero(claims.certified & claims.reachable[:, k])
            entry: dict[str, Any] = {"pair": k + 1, "attacked": int(sel.size), "violations": 0}
            t1 = time.perf_counter()
            if sel.size:
                xs, ys = x[torch.as_tensor(sel)], y[torch.as_tensor(sel)]
                bound = claims.cert_margin[k][sel]
                stop = torch.as_tensor(bound - _slack(bound, s.tol), dtype=torch.float64)
                _, pts = _minimize(lambda z, idx: min_margin(net(z), ys[idx]), xs, stop, eps, s, generator,
                                   s.progress, f"audit attack cert-net {k + 1}")
                with torch.no_grad():
                    found = min_margin(net64(pts.double()), ys).numpy()
                    wrong = (net(pts).argmax(-1) != ys).numpy()
                bad = (found < bound - _slack(bound, s.tol)) | wrong
                found_bad.update(int(claims.index[r]) for r in sel[bad])
                entry.update({"violations": int(bad.sum()), "misclassified": int(wrong.sum()),
                              "min_gap": float((found - bound).min()), "mean_gap": float((found - bound).mean()),
                              "listed": _listed([{"index": int(claims.index[r]), "recorded": float(bound[i]),
                                                  "found": float(found[i]), "misclassified": bool(wrong[i])}
                                                 for i, r in enumerate(sel) if bad[i]])})
                full = x[torch.as_tensor(rows)].clone()
                full[torch.as_tensor(np.searchsorted(rows, sel))] = pts
                candidates.append(full)
            entry["seconds"] = time.perf_counter() - t1
            out["cert_net"].append(entry)
            gate_fn = (lambda z, k=k: recorded_selector(model, k, z))
            gate64 = wide(model.gates[str(k)]) if model.selection[k] == "gate" else None
            for claim, mask, sign in (("fires", claims.fires(k), 1.0), ("silent", claims.silent(k), -1.0)):
                sel = np.flatnonzero(mask)
                entry = {"pair": k + 1, "claim": claim, "attacked": int(sel.size), "violations": 0}
                t1 = time.perf_counter()
                if sel.size:
                    xs = x[torch.as_tensor(sel)]
                    bound = (claims.lb if claim == "fires" else claims.ub)[k][sel]
                    stop = torch.as_tensor(sign * bound - _slack(bound, s.tol), dtype=torch.float64)
                    _, pts = _minimize(lambda z, idx, sign=sign: sign * gate_fn(z), xs, stop, eps, s, generator,
                                       s.progress, f"audit attack gate {k + 1} ({claim})")
                    with torch.no_grad():
                        if gate64 is not None:
                            g64 = gate64(pts.double()).squeeze(-1).numpy()
                        else:
                            g64 = recorded_selector(model, k, pts.double(), wide(model.certs[k])(pts.double())).numpy()
                        fired = (model.gate_value(k, pts) >= float(claims.thresholds[k])).numpy()  # as deployed
                    bad = sign * g64 < sign * bound - _slack(bound, s.tol)
                    crossed = ~fired if claim == "fires" else fired
                    found_bad.update(int(claims.index[r]) for r in sel[bad | crossed])
                    entry.update({"violations": int((bad | crossed).sum()), "crossed_threshold": int(crossed.sum()),
                                  "min_gap": float((sign * (g64 - bound)).min()),
                                  "listed": _listed([{"index": int(claims.index[r]), "recorded": float(bound[i]),
                                                      "found": float(g64[i]), "crossed_threshold": bool(crossed[i])}
                                                     for i, r in enumerate(sel) if bad[i] or crossed[i]])})
                    full = x[torch.as_tensor(rows)].clone()
                    full[torch.as_tensor(np.searchsorted(rows, sel))] = pts
                    candidates.append(full)
                entry["seconds"] = time.perf_counter() - t1
                out["gate"].append(entry)
        sel = np.flatnonzero(claims.certified & claims.reachable[:, n])  # certificates that need core_ok
        entry = {"attacked": int(sel.size), "violations": 0}
        if sel.size:
            ok = torch.ones(sel.size, dtype=torch.bool)
            for part in _batches(np.arange(sel.size), int(s.batch_size)):
                p = torch.as_tensor(sel[part])
                ok[torch.as_tensor(part)], _ = pgd_pruned(model.core, x[p], y[p], eps, steps=int(s.steps),
                                                          step_size=float(s.step_size), restarts=int(s.restarts),
                                                          decay_at=tuple(s.decay_at), generator=generator)
            found_bad.update(int(claims.index[r]) for r in sel[~ok.numpy()])
            entry.update({"violations": int((~ok).sum()),
                          "listed": _listed([int(claims.index[r]) for i, r in enumerate(sel) if not ok[i]])})
        out["core"] = entry
    entry = {"attacked": 0, "violations": 0}
    t1 = time.perf_counter()
    if s.composed and rows.size:
        broken = np.zeros(rows.size, bool)
        for part in _progress(_batches(np.arange(rows.size), int(s.batch_size)), s.progress,
                              "audit attack composed model"):
            p, r = torch.as_tensor(part), torch.as_tensor(rows[part])
            reach = None if proven is None else torch.as_tensor(proven[rows[part]])
            ok, _ = attack_composed(model, x[r], y[r], eps, model.thresholds, steps=int(s.steps), reachable=reach,
                                    restarts=int(s.restarts), step_size=float(s.step_size), loss="margin",
                                    decay_at=tuple(s.decay_at), candidates=[c[p] for c in candidates],
                                    generator=generator)
            broken[part] = ~ok.numpy()
        found_bad.update(int(claims.index[r]) for r in rows[broken])
        entry = {"attacked": int(rows.size), "violations": int(broken.sum()),
                 "listed": _listed([int(claims.index[r]) for r in rows[broken]]), "seconds": time.perf_counter() - t1,
                 "branches_ruled_out_by_reference": 0 if proven is None else int((~proven[rows]).sum())}
    out["composed"] = entry
    out["violations"] = sum(e["violations"] for e in out["cert_net"] + out["gate"]) + out["core"]["violations"] \
        + entry["violations"]
    out["seconds"] = time.perf_counter() - t0
    return out


class _Composed(nn.Module):
    """The composed model as one differentiable classifier for AutoAttack: every branch runs, the
    routing rule picks each input's logits (the gradient flows through the answering branch)."""

    def __init__(self, model: ACEModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        from ace_lightning.routing import composed_output, first_firing

        outs = [cert(z) for cert in self.model.certs]
        gates = torch.stack([self.model.gate_value(i, z, outs[i]) for i in range(len(outs))], dim=1)
        return composed_output(outs + [self.model.core(z)], first_firing(gates.detach(), self.model.thresholds))


def autoattack_module():
    """The AutoAttack class (fra31's ``autoattack`` or PyPI's ``pyautoattack``), or None."""
    for name in ("autoattack", "pyautoattack"):
        try:
            return __import__(name, fromlist=["AutoAttack"]).AutoAttack
        except ImportError:
            continue
    return None


def autoattack_check(model: ACEModel, x: torch.Tensor, y: torch.Tensor, claims: Claims, eps: float,
                     s: AuditSettings, found_bad: Optional[set] = None) -> dict:
    """AutoAttack (Croce and Hein, ICML 2020) on the composed model at every certified input,
    when installed (an optional extra: it is not on PyPI under its own name). Any input it
    breaks is a violation."""
    import inspect

    if s.autoattack == "off":
        return {"ran": False, "reason": "autoattack=off"}
    AutoAttack = autoattack_module()
    if AutoAttack is None:
        return {"ran": False, "reason": "not installed (pip install git+https://github.com/fra31/auto-attack, "
                                        "or pyautoattack)"}
    rows = np.flatnonzero(claims.certified)
    num_classes = int(model.certs[0](x[:1]).shape[-1])
    attacks = [a for a in s.autoattack_attacks if num_classes >= 4 or a in ("apgd-ce", "square", "fab")]
    if not rows.size:
        return {"ran": False, "reason": "no certified input"}
    t0 = time.perf_counter()
    params = inspect.signature(AutoAttack.__init__).parameters
    wrapped = _Composed(model).eval()
    kw = {"norm": "Linf", "eps": float(eps), "version": "custom", "device": "cpu", "seed": int(s.seed)}
    kw["attacks_to_run" if "attacks_to_run" in params else "attacks"] = list(attacks)
    if "verbose" in params:
        kw["verbose"] = False
    adversary = AutoAttack(wrapped, **kw)
    if hasattr(adversary, "apgd_targeted"):
        adversary.apgd_targeted.n_target_classes = min(9, num_classes - 1)
    if hasattr(adversary, "fab"):
        adversary.fab.n_target_classes = min(9, num_classes - 1)
    run = adversary.run_standard_evaluation
    size = "bs" if "bs" in inspect.signature(run).parameters else "batch_size"
    r = torch.as_tensor(rows)
    with torch.no_grad():
        x_adv = run(x[r], y[r], **{size: int(s.batch_size)})
        x_adv = x_adv[0] if isinstance(x_adv, tuple) else x_adv  # pyautoattack: (x_adv, y_adv)
        x_adv = torch.max(torch.min(x_adv, (x[r] + eps).clamp(0, 1)), (x[r] - eps).clamp(0, 1))
        wrong = (model(x_adv).argmax(-1) != y[r]).numpy()
    if found_bad is not None:
        found_bad.update(int(claims.index[i]) for i in rows[wrong])
    return {"ran": True, "package": AutoAttack.__module__.split(".")[0], "attacks": list(attacks),
            "attacked": int(rows.size), "violations": int(wrong.sum()),
            "listed": _listed([int(claims.index[i]) for i in rows[wrong]]), "seconds": time.perf_counter() - t0}


# -- (c) the exact check ---------------------------------------------------------------------------

def milp_check(model: ACEModel, x: torch.Tensor, y: torch.Tensor, claims: Claims, eps: float,
               s: AuditSettings, found_bad: Optional[set] = None) -> dict:
    """(c): the exact minimum of each sampled input's smallest cert-net margin over the ball
    (MILP), against its recorded bound (cert_margin: a lower bound whether or not it certified).
    A point of the ball below the recorded bound is a violation. The solver's lower bound, at the
    optimum or at the time limit, proves a certified margin (>= the record) or an uncertified input
    robust (> 0), up to the solver's tolerances. The sample: inputs the cert-net classifies
    correctly at x, half of them certified (seeded)."""
    from ace_lightning.bounds.milp import min_margin_milp, net_steps, scipy_missing

    if s.milp_sample == 0:
        return {"ran": False, "reason": "milp_sample=0"}
    missing = scipy_missing()
    if missing:
        return {"ran": False, "reason": missing}
    t0 = time.perf_counter()
    rng = np.random.default_rng(int(s.seed))
    out: dict[str, Any] = {"ran": True, "time_limit_s": float(s.milp_time_limit_s),
                           "max_unstable": int(s.milp_max_unstable), "pairs": [], "violations": 0}
    for k in range(claims.n_pairs):
        net = model.certs[k]
        why = reference_problem(net, x, s.reference_max_entries)
        if why:
            out["pairs"].append({"pair": k + 1, "skipped": why})
            continue
        certified = np.flatnonzero(claims.cert_ok[k] & claims.cert_correct[k])
        open_ = np.flatnonzero(~claims.cert_ok[k] & claims.cert_correct[k])
        half = min(certified.size, (s.milp_sample + 1) // 2)
        take = min(open_.size, s.milp_sample - half)
        half = min(certified.size, s.milp_sample - take)
        sample = np.concatenate([rng.choice(certified, half, replace=False), rng.choice(open_, take, replace=False)])
        steps = net_steps(net, x[:1])
        entries = []
        for r in _progress(sample, s.progress, f"audit MILP cert-net {k + 1} (one input a batch)"):
            res = min_margin_milp(net, x[int(r)].unsqueeze(0), int(y[int(r)]), eps,
                                  time_limit_s=float(s.milp_time_limit_s), max_unstable=int(s.milp_max_unstable),
                                  steps=steps)
            bound = float(claims.cert_margin[k][r])
            violation = res.attained is not None and res.attained < bound - float(_slack(np.array(bound), s.tol))
            if violation and found_bad is not None:
                found_bad.add(int(claims.index[r]))
            entries.append({"index": int(claims.index[r]), "certified": bool(claims.cert_ok[k][r]),
                            "recorded": bound, "status": res.status, "exact": res.minimum,
                            "dual_bound": res.dual_bound, "attained": res.attained, "unstable": res.unstable,
                            "seconds": round(res.seconds, 3), "gap": None if res.minimum is None else res.minimum - bound,
                            "violation": bool(violation), **({"reason": res.reason} if res.reason else {})})
        solved = [e for e in entries if e["status"] == "optimal"]
        gaps = [e["gap"] for e in solved if e["certified"]]
        bounded = [e for e in entries if e["certified"] and e["dual_bound"] is not None]
        out["pairs"].append({
            "pair": k + 1, "sampled": len(entries), "solved": len(solved),
            "skipped": sum(e["status"] == "skipped" for e in entries),
            "time_limit": sum(e["status"] == "time_limit" for e in entries),
            "violations": sum(e["violation"] for e in entries),
            "certified_sampled": int(half), "mean_gap_certified": float(np.mean(gaps)) if gaps else None,
            # the solver's lower bound (optimal or not) already at least the recorded margin
            "certified_proved": sum(e["dual_bound"] >= e["recorded"] for e in bounded),
            "uncertified_sampled": int(take),
            "uncertified_robust": sum(1 for e in entries if not e["certified"] and e["dual_bound"] is not None
                                      and e["dual_bound"] > 0),
            "uncertified_not_robust": sum(1 for e in entries if not e["certified"] and e["attained"] is not None
                                          and e["attained"] <= 0),
            "inputs": entries})
        out["violations"] += out["pairs"][-1]["violations"]
    out["seconds"] = time.perf_counter() - t0
    return out


# -- one certify folder ----------------------------------------------------------------------------

def audit_stage(stage_dir: Path, s: AuditSettings) -> dict:
    """Audit one certify folder; writes <stage_dir>/audit.json atomically and returns its content."""
    from ace_lightning.sweep import load_records

    t0 = time.perf_counter()
    stage_dir = Path(stage_dir).resolve()
    manifest, records_path = _stage_files(stage_dir)
    records = load_records(records_path, split=s.split)
    model = ACEModel.load(stage_dir / "ace_model.pt").eval()
    if records.n_pairs != model.num_branches:
        raise StageInputError(f"{records_path} holds {records.n_pairs} pair(s), ace_model.pt {model.num_branches}")
    eps = float(manifest.get("eps", model.spec.get("eps")))
    thresholds = model.thresholds.double().numpy()  # exactly what the exported model compares with
    claims = read_claims(records, thresholds, class_thresholds(model))
    x, y = audit_inputs(manifest, records, s.split, s.data_dir)
    certification = dict(manifest.get("certification") or model.spec.get("certify") or {})
    chosen = manifest.get("chosen_operating_point") or {}
    log.info(f"audit {stage_dir}: {int(claims.certified.sum()):,} of {len(claims.index):,} {s.split} inputs certified "
             f"at the exported threshold(s) {[float(t) for t in thresholds]}")
    report: dict[str, Any] = {
        "stage_dir": str(stage_dir), "split": s.split, "eps": eps, "inputs": int(len(claims.index)),
        "thresholds": [float(t) for t in thresholds], "certified": int(claims.certified.sum()),
        "selection": list(model.selection), "settings": s.as_dict(),
        "records_at_chosen_point": {
            "threshold": chosen.get("threshold"),
            "cert_acc": (chosen.get("test") or {}).get("cert_acc") if s.split == "test" else None,
            "cert_acc_at_exported_threshold": float(claims.certified.mean())}}
    proven = None
    if s.reference:
        report["reference"], proven = reference_check(model, x, y, claims, eps, certification, s)
    else:
        report["reference"] = {"ran": False, "reason": "reference=false"}
    bad: set[int] = set()  # the inputs (dataset indices) some check found a concrete counterexample for
    report["attack"] = attack_check(model, x, y, claims, eps, s, bad, proven)
    report["autoattack"] = autoattack_check(model, x, y, claims, eps, s, bad)
    report["milp"] = milp_check(model, x, y, claims, eps, s, bad)
    report["violations"] = len(bad)
    report["violating_inputs"] = _listed(sorted(bad))
    report["wall_s"] = time.perf_counter() - t0
    atomic_write_text(stage_dir / AUDIT_FILE, json.dumps(report, indent=2, default=_json_default))
    return report


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def verdict(report: Mapping[str, Any]) -> str:
    """The one line the CLI prints per audited folder."""
    a = report["attack"]
    parts = [f"attack {a['steps']}x{a['restarts']} {a['seconds']:.0f} s"]
    ref = report["reference"]
    parts.append(f"reference confirmed {ref['confirmed']:,}/{ref['certified']:,}" if ref.get("ran")
                 else "no reference")
    aa = report["autoattack"]
    parts.append(f"AutoAttack {aa['attacked']:,} inputs" if aa.get("ran") else
                 f"AutoAttack {'not installed' if 'not installed' in str(aa.get('reason')) else 'off'}")
    milp = report["milp"]
    if milp.get("ran"):
        solved = sum(p.get("solved", 0) for p in milp["pairs"])
        sampled = sum(p.get("sampled", 0) for p in milp["pairs"])
        gaps = [p["mean_gap_certified"] for p in milp["pairs"] if p.get("mean_gap_certified") is not None]
        robust = sum(p.get("uncertified_robust", 0) for p in milp["pairs"])
        open_ = sum(p.get("uncertified_sampled", 0) for p in milp["pairs"])
        proved = sum(p.get("certified_proved", 0) for p in milp["pairs"])
        certified = sum(p.get("certified_sampled", 0) for p in milp["pairs"])
        parts.append(f"MILP {solved}/{sampled} solved" + (f", mean gap {np.mean(gaps):.3g}" if gaps else "")
                     + f", {proved}/{certified} certified margins proved, {robust}/{open_} uncertified robust")
    else:
        parts.append(f"MILP not run: {milp.get('reason')}")
    parts.append(f"{report['wall_s']:.0f} s")
    n = report["violations"]
    return (f"audit: {n:,} violation{'s' if n != 1 else ''} in {report['certified']:,} certified inputs "
            f"({'; '.join(parts)}) -> {Path(report['stage_dir']) / AUDIT_FILE}")


def audit_run(run_dir: Path, s: AuditSettings) -> list[dict]:
    """Audit every certified folder of ``run_dir`` (or ``s.stage``); one verdict line each."""
    reports = []
    for folder in certified_folders(run_dir, s.stage):
        report = audit_stage(folder, s)
        log.info(verdict(report))
        reports.append(report)
    return reports
