"""Random certification records for the sweep, report and CLI tests (columns as the certify
stage writes them: ace_lightning.records)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ace_lightning.records import pair_suffix


def synthetic_records(n: int, *, n_pairs: int = 1, seed: int = 0, sound: bool = True,
                      decimals: int | None = 2, splits: Sequence[str] = ("val", "test")) -> dict[str, np.ndarray]:
    """Random records. ``sound`` makes them consistent with a real
    certifier (cert_ok => cert_correct, core_ok => core_correct, lb_g <= g <= ub_g); ``decimals``
    rounds the gate columns so that ties, including ties with T, are frequent."""
    rng = np.random.default_rng(seed)
    cols: dict[str, np.ndarray] = {
        "index": np.arange(n),
        "split": np.asarray(splits)[rng.integers(0, len(splits), n)],
        "label": rng.integers(0, 10, n),
    }
    core_correct = rng.random(n) < 0.9
    core_ok = core_correct & (rng.random(n) < 0.1) if sound else rng.random(n) < 0.1
    cols["core_pred"] = np.where(core_correct, cols["label"], (cols["label"] + 1) % 10)
    cols["core_correct"], cols["core_ok"] = core_correct.astype(int), core_ok.astype(int)
    for i in range(1, n_pairs + 1):
        sfx = pair_suffix(i, n_pairs)
        cert_correct = rng.random(n) < 0.7
        cert_ok = cert_correct & (rng.random(n) < 0.75) if sound else rng.random(n) < 0.5
        g = np.where(cert_ok, rng.normal(1.0, 1.0, n), rng.normal(-1.0, 1.0, n))
        w1, w2 = rng.exponential(0.5, n), rng.exponential(0.5, n)
        lb, ub = (g - w1, g + w2) if sound else (g + rng.normal(0, 0.5, n), g + rng.normal(0, 0.5, n))
        if decimals is not None:
            g, lb, ub = np.round(g, decimals), np.floor(lb * 10**decimals) / 10**decimals, np.ceil(ub * 10**decimals) / 10**decimals
            if not sound:
                lb, ub = np.round(lb, decimals), np.round(ub, decimals)
        cols["cert_pred" + sfx] = np.where(cert_correct, cols["label"], (cols["label"] + 2) % 10)
        cols["cert_correct" + sfx], cols["cert_ok" + sfx] = cert_correct.astype(int), cert_ok.astype(int)
        cols["g" + sfx], cols["lb_g" + sfx], cols["ub_g" + sfx] = g, lb, ub
    return cols
