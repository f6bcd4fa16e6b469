"""The certify stage's attack on the test split: core alone, cert-net alone and the composed
model at the operating points, for the adversarial accuracies of the report and as a soundness
check of the records (an attack that breaks a certified input is a bug: SoundnessError).

Why a module of its own: which inputs to attack, with which candidates and on which branches is a
plan of its own (effort only where a number can change), separate from certifying and exporting.
"""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from ace_lightning import console, rule
from ace_lightning.ace import ACEModel
from ace_lightning.atomic import atomic_write_text
from ace_lightning.certify_pass import thresholds_text
from ace_lightning.errors import SoundnessError
from ace_lightning.records import load_records


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

    label = label or (what if thresholds is None else f"composed T={thresholds_text([thresholds])}")
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
            key = (label or (what if thresholds is None else f"composed T={thresholds_text([thresholds])}")).replace(" ", "_")
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


def attack_and_check(model: ACEModel, loader: DataLoader, records_path: Path, stage_dir: Path, eps: float,
                     attack: Mapping[str, Any], points: Sequence[dict], progress: bool = True) -> int:
    """Step 3: attack the test split (single nets, the composed model at the operating points),
    add adv_acc to ``points`` and operating_points.json; raises SoundnessError if the attack
    breaks an input the records certify. Returns the number of such inputs (0)."""
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
