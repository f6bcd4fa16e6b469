"""Gate labels (docs/METHOD.md section 6): an input gets label 1 iff the cert-net is certified
correct on it (every margin z_y - z_j provably positive over the ball), computed on the
*un-augmented* images (the reference code labelled augmented ones by mistake).

Labels are computed once per (cert-net weights, eps, earlier cascade pairs) and cached in the
gate's stage folder as ``labels_<cert sha256[:12]>_eps<eps>.pt``: a weights-only file (tensors,
numbers, strings; ``torch.load(weights_only=True)``) holding eps, the bound method, the cert-net's
hash and, per split, the labels with the dataset indices they belong to. A resumed or
re-configured gate stage reuses it instead of certifying the training set again.

Cascades (docs/METHOD.md section 2): pairs (cert-net, gate) are tried in order and the first gate
that fires answers. If an earlier gate certifiably fires on x (lb_g >= T over the whole ball),
pair i is never reached anywhere on the ball, so x says nothing about gate i: it gets the label
``EXCLUDED`` (-1) and is left out of gate i's training set and metrics.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import torch
import lightning as L
from torch import nn
from torch.utils.data import Dataset

from ace_lightning.bounds import normalize_method, output_bounds
from ace_lightning.bounds.ladder import margin_ladder
from ace_lightning.nets import eval_mode
from ace_lightning.atomic import atomic_torch_save
from ace_lightning.errors import ConfigError, StageInputError

LABELS_FORMAT = 1
EXCLUDED = -1
SPLITS = ("train", "val", "test")


# -- the label rule ------------------------------------------------------------------------------

def cascade_labels(cert_ok: torch.Tensor, taken_before: Optional[torch.Tensor] = None) -> torch.Tensor:
    """int8 labels for one pair of a cascade: 1 where its cert-net is certified correct, 0 where
    not, ``EXCLUDED`` where an earlier pair certifiably takes the input. ``taken_before``: None
    (a single pair, or the first one), [N] or [pairs_before, N] booleans lb_g_j >= T_j; any
    earlier pair taking x excludes it."""
    labels = cert_ok.bool().to(torch.int8)
    if taken_before is not None and taken_before.numel():
        taken = taken_before.bool()
        if taken.dim() == 2:
            taken = taken.any(dim=0)
        if taken.shape != labels.shape:
            raise ConfigError(f"taken_before has shape {tuple(taken_before.shape)}, cert_ok {tuple(cert_ok.shape)}")
        labels = torch.where(taken, torch.full_like(labels, EXCLUDED), labels)
    return labels


@dataclass(frozen=True)
class Balance:
    positives: int
    negatives: int
    excluded: int = 0

    @property
    def labelled(self) -> int:
        return self.positives + self.negatives

    @property
    def fraction(self) -> float:
        """p: the fraction of label 1 among the labelled (non-excluded) inputs; nan if none."""
        return self.positives / self.labelled if self.labelled else math.nan

    def as_dict(self) -> dict:
        return {"positives": self.positives, "negatives": self.negatives, "excluded": self.excluded,
                "fraction": None if math.isnan(self.fraction) else round(self.fraction, 6)}

    def describe(self) -> str:
        pct = "n/a" if math.isnan(self.fraction) else f"{100 * self.fraction:.1f}%"
        extra = f", {self.excluded} excluded (taken by earlier pairs)" if self.excluded else ""
        return f"{self.positives}/{self.labelled} certified ({pct}){extra}"


def label_balance(labels: torch.Tensor) -> Balance:
    return Balance(int((labels == 1).sum()), int((labels == 0).sum()), int((labels == EXCLUDED).sum()))


# -- certification passes (batched, no grad, eval mode) -------------------------------------------

def label_methods(method: Any) -> str:
    """The canonical name of a label certification: one bound method ('IBP') or a cheap-to-tight
    ladder ('IBP+CROWN-IBP+CROWN', from a list or a '+'-joined string), as certify runs it."""
    parts = method.split("+") if isinstance(method, str) else list(method)
    if not parts:
        raise ConfigError("gate labels need at least one bound method")
    return "+".join(normalize_method(m) for m in parts)


REFUTE_STEPS = 10  # PGD steps that spare the tighter methods of a ladder inputs with a counterexample


def _batches(loader: Iterable, desc: str, progress: bool):
    from ace_lightning.console import progress as bar

    return bar(loader, progress, desc=desc)


@torch.no_grad()
def certify_dataset(cert_net: nn.Module, loader: Iterable, eps: float, method: str,
                    device: torch.device | str = "cpu", progress: bool = False,
                    desc: str = "gate labels", return_correct: bool = False):
    """cert_ok per input (bool, loader order): all margins z_y - z_j provably positive, by one
    bound method or a cheap-to-tight ladder (``label_methods``); with ``return_correct`` also
    whether the cert-net classifies the input correctly at x."""
    from ace_lightning.attacks.pgd import counterexample_found

    methods = label_methods(method).split("+")
    out, correct = [], []
    with eval_mode(cert_net):
        for batch in _batches(loader, desc, progress):
            x, y = batch[0].to(device), batch[1].to(device)

            def refute(idx, x=x, y=y):
                return counterexample_found(cert_net, x[idx], y[idx], eps, REFUTE_STEPS)

            cert = margin_ladder(cert_net, x, y, eps, methods, refute=refute)
            out.append(cert.ok.cpu())
            correct.append((cert.logits.argmax(-1) == y).cpu())
    empty = torch.zeros(0, dtype=torch.bool)
    ok = torch.cat(out) if out else empty
    return (ok, torch.cat(correct) if correct else empty) if return_correct else ok


@torch.no_grad()
def gate_certifiably_fires(gate: nn.Module, loader: Iterable, eps: float, method: str, threshold: float,
                           device: torch.device | str = "cpu", progress: bool = False,
                           desc: str = "earlier gate") -> torch.Tensor:
    """lb_g >= T over the ball, per input (bool, loader order)."""
    out = []
    with eval_mode(gate):
        for batch in _batches(loader, desc, progress):
            lb, _ = output_bounds(gate, batch[0].to(device), eps, method)
            out.append((lb.view(-1) >= threshold).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool)


@dataclass
class EarlierGate:
    """The trained gate of an earlier cascade pair: where it lives, its bound method and threshold;
    ``net`` is built (from ``net_cfg`` and ``path``) only when labels have to be computed."""

    name: str
    method: str
    threshold: float
    sha256: str
    net_cfg: Optional[Mapping[str, Any]] = None
    path: Optional[Path] = None
    net: Optional[nn.Module] = None


def compute_labels(cert_net: nn.Module, loaders: Mapping[str, Optional[Iterable]], eps: float, method: str,
                   earlier: Sequence[EarlierGate] = (), device: torch.device | str = "cpu",
                   progress: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """split -> {"labels": int8, "cert_ok": bool, "correct": bool} for every split with a loader."""
    cert_net.to(device)
    for g in earlier:
        g.net.to(device)
    result = {}
    for split, loader in loaders.items():
        if loader is None:
            continue
        ok, correct = certify_dataset(cert_net, loader, eps, method, device, progress, f"gate labels ({split})",
                                      return_correct=True)
        taken = None
        if earlier:
            taken = torch.stack([gate_certifiably_fires(g.net, loader, eps, g.method, g.threshold, device,
                                                        progress, f"{g.name} ({split})") for g in earlier])
        result[split] = {"labels": cascade_labels(ok, taken), "cert_ok": ok, "correct": correct}
    return result


NEGATIVES = ("uncertified", "wrong")


def check_negatives(negatives: Optional[str]) -> str:
    """The ``negatives`` option (null: uncertified), or a one-line error."""
    negatives = negatives or "uncertified"
    if negatives not in NEGATIVES:
        raise ConfigError(f"negatives must be one of {', '.join(NEGATIVES)}, got {negatives!r}")
    return negatives


def training_labels(split: Mapping[str, torch.Tensor], negatives: str = "uncertified") -> torch.Tensor:
    """The labels a gate learns from. negatives "uncertified" (the paper): 0 for every input the
    cert-net does not certify; "wrong": 0 only where the cert-net misclassifies x, and the correct
    but uncertified inputs are left out (EXCLUDED): routing them to the cert-net costs no natural
    accuracy, so a gate need not spend capacity rejecting them."""
    negatives = check_negatives(negatives)
    labels = split["labels"].clone()
    if negatives == "wrong":
        labels[(labels == 0) & split["correct"].bool()] = EXCLUDED
    return labels


# -- the cache file --------------------------------------------------------------------------------

def cascade_key(earlier: Sequence[EarlierGate]) -> str:
    """'' for a single pair; else a short hash of the earlier gates and their thresholds."""
    if not earlier:
        return ""
    text = json.dumps([[g.sha256, float(g.threshold), normalize_method(g.method)] for g in earlier])
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def labels_filename(cert_sha256: str, eps: float, after: str = "") -> str:
    tail = f"_after{after}" if after else ""
    return f"labels_{cert_sha256[:12]}{tail}_eps{float(eps)!r}.pt"


def make_payload(labels: Mapping[str, Mapping[str, torch.Tensor]], indices: Mapping[str, Sequence[int]],
                 *, eps: float, method: str, cert_sha256: str, after: str = "") -> dict:
    splits = {}
    for split, d in labels.items():
        splits[split] = {"labels": d["labels"].to(torch.int8).cpu(), "cert_ok": d["cert_ok"].bool().cpu(),
                         "correct": d["correct"].bool().cpu(),
                         "indices": torch.as_tensor(list(indices[split]), dtype=torch.int64)}
    return {"format": LABELS_FORMAT, "eps": float(eps), "method": label_methods(method),
            "cert_sha256": str(cert_sha256), "after": str(after), "splits": splits}


def save_labels(payload: Mapping[str, Any], path: Path) -> Path:
    atomic_torch_save(dict(payload), path)
    return Path(path)


def read_labels(path: Path) -> dict:
    """The payload of a label file (weights_only); a one-line StageInputError if unreadable."""
    path = Path(path)
    if not path.is_file():
        raise StageInputError(f"gate labels file {path} not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
        raise StageInputError(f"cannot read gate labels {path} ({type(err).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != LABELS_FORMAT or "splits" not in payload:
        raise StageInputError(f"{path} is not a gate labels file (format {LABELS_FORMAT})")
    return payload


def label_problems(payload: Mapping[str, Any], *, eps: float, method: str, cert_sha256: str,
                   after: str = "", indices: Optional[Mapping[str, Sequence[int]]] = None) -> list[str]:
    """Why ``payload`` cannot serve this run (empty list: it can)."""
    problems = []
    if not math.isclose(float(payload["eps"]), float(eps), rel_tol=1e-9, abs_tol=1e-12):
        problems.append(f"they were made with eps={payload['eps']:g}, this run uses eps={float(eps):g}")
    if payload.get("cert_sha256") != cert_sha256:
        problems.append(f"they belong to cert-net weights {str(payload.get('cert_sha256'))[:12]}, "
                        f"not {cert_sha256[:12]}")
    if payload.get("method") != label_methods(method):
        problems.append(f"they were made with {payload.get('method')}, this run labels with "
                        f"{label_methods(method)}")
    if str(payload.get("after", "")) != str(after):
        problems.append("they were made for a different cascade position (earlier gates differ)")
    if any("correct" not in d for d in payload["splits"].values()):
        problems.append("they predate the cert-net's correctness per input (needed by negatives: wrong)")
    for split, idx in (indices or {}).items():
        stored = payload["splits"].get(split)
        if stored is None:
            problems.append(f"they have no '{split}' split")
        elif stored["indices"].tolist() != list(idx):
            problems.append(f"their '{split}' images differ from this run's (data split or subset changed)")
    return problems


def find_cached(stage_dir: Path, name: str) -> Optional[Path]:
    """``stage_dir/name``; failing that, the newest copy in a backup of the stage folder
    (``<stage>.old-*``, made by ``overwrite=true``), copied back in."""
    stage_dir = Path(stage_dir)
    path = stage_dir / name
    if path.is_file():
        return path
    backups = sorted(stage_dir.parent.glob(f"{stage_dir.name}.old-*/{name}"))
    if not backups:
        return None
    stage_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{name}.copy")
    shutil.copyfile(backups[-1], tmp)
    tmp.replace(path)
    return path


# -- datasets that carry the label -----------------------------------------------------------------

class LabeledDataset(Dataset):
    """Items ``(x, y, gate_label)``. Training wraps the *augmented* training set: the image is
    augmented, its label is the one computed on the un-augmented image (same position).
    ``drop_excluded`` leaves out inputs taken by earlier cascade pairs. Picklable."""

    def __init__(self, base: Dataset, labels: torch.Tensor, drop_excluded: bool = False) -> None:
        if len(base) != len(labels):
            raise ConfigError(f"{len(labels)} gate labels for a dataset of {len(base)} images")
        self.base = base
        self.labels = labels.to(torch.int8).clone()
        self.positions = (self.labels != EXCLUDED).nonzero().flatten() if drop_excluded else None

    def __len__(self) -> int:
        return len(self.positions) if self.positions is not None else len(self.base)

    def __getitem__(self, i: int):
        j = int(self.positions[i]) if self.positions is not None else i
        x, y = self.base[j][:2]
        return x, y, int(self.labels[j])

    def __getitems__(self, indices: list[int]) -> list:
        """A batch through the base dataset's batched fetch when it has one (the same items)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        js = (self.positions[idx] if self.positions is not None else idx).tolist()
        fetch = getattr(self.base, "__getitems__", None)
        items = fetch(js) if callable(fetch) else [self.base[j] for j in js]
        return [(item[0], item[1], label) for item, label in zip(items, self.labels[js].tolist())]


def attach_labels(dm: Any, labels: Mapping[str, torch.Tensor], drop_excluded: bool = True) -> None:
    """Make the (set-up) datamodule's train/val/test loaders yield (x, y, gate_label); the training
    set leaves out the excluded inputs (``drop_excluded``)."""
    dm.train_set = LabeledDataset(dm.train_set, labels["train"], drop_excluded=drop_excluded)
    if len(dm.val_set) and "val" in labels:
        dm.val_set = LabeledDataset(dm.val_set, labels["val"])
    if "test" in labels:
        dm.test_set = LabeledDataset(dm.test_set, labels["test"])


# -- the datamodule that carries the labels ---------------------------------------------------------

class GateLabelsDataModule(L.LightningDataModule):
    """The run's datamodule with gate labels attached (items ``(x, y, gate_label)``).

    ``prepare_data`` (one process for the whole job: Lightning calls it on global rank 0 only)
    finds the labels (an explicit ``labels_file``, the stage folder's cache, or a fresh
    certification pass written to the cache); ``setup`` (every rank) reads that one file and
    attaches the labels. Under DDP the cert-net is certified once, not once per rank.
    """

    prepare_data_per_node = False  # the run folder is shared by every node

    def __init__(self, base: Any, stage_dir: Path, cert_net: nn.Module, cert_sha: str, eps: float,
                 method: str, earlier: Sequence[EarlierGate] = (), negatives: str = "uncertified",
                 device: torch.device | str = "cpu", progress: bool = False,
                 labels_file: Optional[str] = None) -> None:
        super().__init__()
        self.base, self.stage_dir, self.cert_net, self.cert_sha = base, Path(stage_dir), cert_net, cert_sha
        self.eps, self.method, self.earlier = float(eps), label_methods(method), list(earlier)
        self.negatives = check_negatives(negatives)
        self.device, self.progress = device, progress
        self.labels_file = Path(labels_file).expanduser().resolve() if labels_file else None
        self.after = cascade_key(self.earlier)
        self.source = "file" if self.labels_file else "cache"
        self.balance: Optional[dict[str, Balance]] = None

    def __getattr__(self, name: str) -> Any:  # info, indices, splits: the wrapped datamodule's
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    @property
    def path(self) -> Path:
        return self.labels_file or self.stage_dir / labels_filename(self.cert_sha, self.eps, self.after)

    def _indices(self) -> dict[str, Sequence[int]]:
        out = {"train": self.base.train_indices, "test": self.base.test_indices}
        if len(self.base.val_indices):
            out["val"] = self.base.val_indices
        return out

    def _problems(self, path: Path) -> list[str]:
        try:
            payload = read_labels(path)
        except StageInputError as err:
            return [str(err)]
        return label_problems(payload, eps=self.eps, method=self.method, cert_sha256=self.cert_sha,
                              after=self.after, indices=self._indices())

    def prepare_data(self) -> None:
        from ace_lightning.console import log

        self.base.prepare_data()
        self.base.setup("fit")
        if self.labels_file:
            problems = self._problems(self.labels_file)
            if problems:
                raise StageInputError(f"gate labels {self.labels_file}: {problems[0]}; point stage.labels_file "
                                      f"at labels made for this run or set it to null to recompute")
            return
        cached = find_cached(self.stage_dir, self.path.name)
        if cached is not None:
            problems = self._problems(cached)
            if not problems:
                return
            log.info(f"gate labels: cached {cached.name} does not fit ({problems[0]}): recomputing")
        indices = self._indices()
        loaders = {"train": self.base.train_eval_dataloader(),
                   "val": self.base.val_dataloader() if "val" in indices else None,
                   "test": self.base.test_dataloader()}
        log.info(f"gate labels: certifying the cert-net on the un-augmented train/val/test images "
                 f"({self.method}, eps={self.eps:g})")
        for g in self.earlier:
            if g.net is None:
                raise StageInputError(f"the gate of stage '{g.name}' is not loaded")
        labels = compute_labels(self.cert_net, loaders, self.eps, self.method, self.earlier, self.device,
                                self.progress)
        save_labels(make_payload(labels, indices, eps=self.eps, method=self.method, cert_sha256=self.cert_sha,
                                 after=self.after), self.path)
        self.source = "computed"

    def setup(self, stage: Optional[str] = None) -> None:
        self.base.setup(stage)
        if self.balance is not None:
            return
        payload = read_labels(self.path)
        problems = self._problems(self.path)
        if problems:  # a file changed between prepare_data and setup, or prepare_data did not run
            raise StageInputError(f"gate labels {self.path}: {problems[0]}")
        splits = {s: training_labels(d, self.negatives) for s, d in payload["splits"].items()}
        self.balance = {s: label_balance(v) for s, v in splits.items()}
        train = self.balance["train"]
        attach_labels(self.base, splits, drop_excluded=0 < train.positives < train.labelled)
        from ace_lightning.console import log

        verb = {"cache": "reused cached", "file": "loaded", "computed": "computed"}[self.source]
        log.info(f"gate labels: {verb} {self.path.name}: train {train.describe()}" +
                 "".join(f"; {s} {b.describe()}" for s, b in self.balance.items() if s != "train"))

    @property
    def info_dict(self) -> dict:
        """What the manifest records about the labels."""
        return {"file": self.path.name if not self.labels_file else str(self.path), "source": self.source,
                "method": self.method, "eps": self.eps,
                **{s: b.as_dict() for s, b in (self.balance or {}).items()}}

    def train_dataloader(self):
        return self.base.train_dataloader()

    def val_dataloader(self):
        return self.base.val_dataloader()

    def test_dataloader(self):
        return self.base.test_dataloader()
