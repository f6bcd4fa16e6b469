"""Selection stages (issue 5): gate labels, the gate stage, entropy co-training, cascades, through
the real configs on tiny synthetic data (one cert stage shared by every test, copied per test)."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from ace_lightning.bounds import output_bounds
from ace_lightning.data import get_dataset_info
from ace_lightning.nets import build_net, final_linear_name
from ace_lightning.registry import run_stage
from ace_lightning.stages import gate_labels
from ace_lightning.errors import StageInputError
from ace_lightning.stages.gate import (
    GateConfig,
    GateStage,
    balanced_pos_weight,
    freeze_all_but_last_linear,
    pos_weight_schedule,
    relu_activity,
)
from ace_lightning.stages.gate_labels import (
    EXCLUDED,
    LabeledDataset,
    cascade_labels,
    label_balance,
    labels_filename,
)
from stage_utils import compose_cfg

# 1x16x16 inputs, 3 classes: a tiny cert-net certifies about a third of them at eps 0.02, so
# both label classes are populated.
EPS = 0.02
BASE = ["data.subset=128", "data.dataset_kwargs.num_classes=3", "data.dataset_kwargs.input_shape=[1,16,16]",
        f"eps={EPS}", "net@cert_net=small", "run_name=run"]
CERT = BASE + ["stage=cert", "stage.warmup_epochs=1", "stage.ramp_epochs=1", "stage.epochs=4",
               "stage.optimizer.lr=5e-3", "stage.val_pgd_steps=0", "stage.val_crown_ibp=false"]
GATE = BASE + ["stage=gate", "stage.epochs=2", "stage.ramp_epochs=1"]


@pytest.fixture(scope="module")
def cert_runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cert_runs")
    manifest = run_stage(compose_cfg(root, CERT))
    assert 0.1 < manifest["metrics"]["test/cert_acc"] < 0.9  # mixed labels for the gate
    return root


@pytest.fixture
def runs(cert_runs, tmp_path) -> Path:
    """A private copy of the runs folder holding the trained cert stage."""
    dst = tmp_path / "runs"
    shutil.copytree(cert_runs, dst)
    return dst


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _info():
    return get_dataset_info("synthetic").specialise(input_shape=[1, 16, 16], num_classes=3)


def _config(**knobs) -> GateConfig:
    """conf/stage/gate.yaml with Adam and no LR schedule, and these knobs."""
    return GateConfig.from_dict({"optimizer": {"name": "adam", "lr": 1e-3}, "lr_schedule": {}, **knobs}, EPS)


class _CaptureStart(L.Callback):
    """The gate's weights when training starts (after initialisation from the cert-net)."""

    def on_fit_start(self, trainer, pl_module):
        self.state = {k: v.detach().clone() for k, v in pl_module.net.state_dict().items()}
        self.trainable = [n for n, p in pl_module.net.named_parameters() if p.requires_grad]


# -- unit pieces -----------------------------------------------------------------------------------

def test_pos_weight_sliding_schedule():
    assert balanced_pos_weight(0.25) == pytest.approx(3.0)
    assert balanced_pos_weight(0.8) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="fraction"):
        balanced_pos_weight(0.0)
    n, c0 = 10, 3.0
    values = [pos_weight_schedule(e, n, c0) for e in (0, 1, 4.5, 8, 10)]
    assert values == pytest.approx([3.0, 3.0, 2.0, 1.0, 1.0])  # balanced until 0.1N, plain from 0.8N
    assert pos_weight_schedule(10, n, c0, sigma=0.5) == pytest.approx(2.0)  # the slide stops half-way
    assert pos_weight_schedule(4.5, n, 0.25) == pytest.approx(0.625)  # p > 1/2: positives down-weighted
    slide = [pos_weight_schedule(e / 4, n, c0) for e in range(41)]
    assert all(a >= b for a, b in zip(slide, slide[1:]))


def test_cascade_label_rule():
    cert_ok = torch.tensor([1, 1, 0, 0, 1, 0], dtype=torch.bool)
    assert cascade_labels(cert_ok).tolist() == [1, 1, 0, 0, 1, 0]  # one pair: label = cert_ok
    taken = torch.tensor([[0, 1, 0, 1, 0, 0],    # pair 0 certifiably fires on inputs 1 and 3
                          [0, 0, 0, 0, 1, 0]], dtype=torch.bool)  # pair 1 on input 4
    labels = cascade_labels(cert_ok, taken)
    assert labels.dtype == torch.int8
    assert labels.tolist() == [1, EXCLUDED, 0, EXCLUDED, EXCLUDED, 0]
    assert cascade_labels(cert_ok, taken[0]).tolist() == [1, EXCLUDED, 0, EXCLUDED, 1, 0]
    b = label_balance(labels)
    assert (b.positives, b.negatives, b.excluded) == (1, 2, 3) and b.fraction == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="shape"):
        cascade_labels(cert_ok, torch.zeros(2, 5, dtype=torch.bool))
    # the training set of pair i leaves the excluded inputs out, keeping the label of each image
    base = [(torch.full((1, 2, 2), float(i)), i % 3) for i in range(6)]
    ds = LabeledDataset(base, labels, drop_excluded=True)
    assert len(ds) == 3 and [int(ds[i][0][0, 0, 0]) for i in range(3)] == [0, 2, 5]
    assert [ds[i][2] for i in range(3)] == [1, 0, 0]


def test_train_last_k_freezes_the_right_params():
    gate = build_net({"name": "small", "kind": "gate"}, _info())
    linears = [n for n, m in gate.named_modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 2
    names = freeze_all_but_last_linear(gate, 1)
    assert names == [f"{linears[-1]}.weight", f"{linears[-1]}.bias"]
    assert [n for n, p in gate.named_parameters() if p.requires_grad] == names
    names = freeze_all_but_last_linear(gate, 2)
    assert sorted(names) == sorted(f"{m}.{p}" for m in linears for p in ("weight", "bias"))
    assert not any(p.requires_grad for n, p in gate.named_parameters() if n.split(".")[0] not in
                   {m.split(".")[0] for m in linears})
    with pytest.raises(ValueError, match="train_last_k"):
        freeze_all_but_last_linear(gate, 3)
    module = GateStage(build_net({"name": "small", "kind": "gate"}, _info()), _config(train_last_k=1), EPS)
    assert [n for n, p in module.net.named_parameters() if p.requires_grad] == [
        f"{linears[-1]}.weight", f"{linears[-1]}.bias"]


def test_gate_loss_uses_the_worst_case_logit_of_each_label():
    torch.manual_seed(0)
    x = torch.rand(6, 1, 16, 16)
    label = torch.tensor([1, 1, 1, 0, 0, 0])
    bce = nn.functional.binary_cross_entropy_with_logits
    for worst_neg in (True, False):
        module = GateStage(build_net({"name": "small", "kind": "gate"}, _info()),
                           _config(worst_case_negatives=worst_neg), EPS)
        loss, robust, g = module.gate_loss(x, label, EPS, kappa=0.25, beta=None, pos_weight=2.0)
        lb, ub = (b.view(-1) for b in output_bounds(module.net, x, EPS, "IBP"))
        worst = torch.cat([lb[:3], (ub if worst_neg else g)[3:]])
        pw = torch.tensor(2.0)
        assert robust.item() == pytest.approx(bce(worst, label.float(), pos_weight=pw).item(), rel=1e-5)
        expected = 0.25 * bce(g, label.float(), pos_weight=pw) + 0.75 * robust
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
        loss.backward()  # differentiable through the bounds
        assert all(p.grad is not None for p in module.net.parameters())
    natural, zero, _ = module.gate_loss(x, label, 0.0, kappa=0.25, beta=None, pos_weight=1.0)
    assert zero.item() == 0.0 and natural.item() == pytest.approx(bce(module.net(x).view(-1), label.float()).item())


def test_validation_metrics_and_dead_unit_diagnostic():
    gate = build_net({"name": "small", "kind": "gate"}, _info())
    module = GateStage(gate, _config(val_crown_ibp=False), EPS)
    head = gate.get_submodule(final_linear_name(gate))
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(3.0)  # selects everything, certifiably
    x = torch.rand(6, 1, 16, 16)
    label = torch.tensor([1, 1, 0, 0, 0, EXCLUDED])
    out = module.evaluate(x, torch.zeros(6, dtype=torch.long), label)
    assert out["certified_selection_rate"].tolist() == [True, True]
    assert out["false_selection_rate"].tolist() == [True, True, True]
    assert out["certified_rejection_rate"].tolist() == [False] * 3
    assert out["gate_acc"].float().mean() == pytest.approx(0.4)  # excluded input not counted
    # a last hidden layer that never fires: every output is the bias (collapsed), its units dead
    hidden = [m for m in gate.modules() if isinstance(m, nn.Linear)][0]
    with torch.no_grad():
        hidden.bias.fill_(-1e3)
    _, dead, collapsed = relu_activity(gate, x)
    assert collapsed.all() and dead >= hidden.out_features / (16 * 8 * 8 + 32 * 4 * 4 + hidden.out_features) - 1e-6


# -- the gate stage end to end -------------------------------------------------------------------------

def test_gate_stage_trains_from_the_cert_net_and_caches_labels(runs, capsys, monkeypatch):
    cap = _CaptureStart()
    manifest = run_stage(compose_cfg(runs, GATE), callbacks=(cap,))
    run_dir = runs / "run"
    gate_dir = run_dir / "gate"
    out = capsys.readouterr().out
    assert manifest["status"] == "complete" and manifest["stage"] == "gate"
    assert manifest["gate_status"] == "trained"
    assert manifest["selection"] == {"type": "network", "threshold": 0.0, "method": "IBP", "training_method": "IBP",
                                     "cert_stage": "cert",
                                     "position": 0, "cascade": ["cert"],
                                     "earlier_thresholds": []}
    cert_sha = manifest["inputs"]["cert"]["sha256"]
    assert cert_sha == json.loads((run_dir / "cert" / "manifest.json").read_text())["outputs"]["weights"]["sha256"]
    # labels: certified once, cached under the cert-net's hash and eps, loadable weights-only
    labels_path = gate_dir / labels_filename(cert_sha, EPS)
    assert labels_path.name == f"labels_{cert_sha[:12]}_eps{EPS}.pt" and labels_path.is_file()
    payload = torch.load(labels_path, weights_only=True)
    assert payload["eps"] == EPS and payload["method"] == "IBP" and payload["cert_sha256"] == cert_sha
    train = payload["splits"]["train"]
    assert train["labels"].shape == train["indices"].shape == (128,)
    bal = manifest["labels"]["train"]
    assert bal["positives"] == int((train["labels"] == 1).sum()) and 0 < bal["positives"] < 128
    assert "gate labels: computed" in out and f"train {bal['positives']}/128 certified" in out
    rows = _rows(gate_dir / "metrics.csv")
    assert any(r.get("labels/train_fraction") for r in rows)  # the balance reaches the loggers
    # the labels are the cert-net's certificates on the un-augmented images
    info = _info()
    cert = build_net(json.loads((run_dir / "cert" / "manifest.json").read_text())["net"], info)
    cert.load_state_dict(torch.load(run_dir / "cert" / "cert.pt", weights_only=True))
    from ace_lightning.stages.certified import certified_correct
    ds = info.build(str(runs), train=True, input_shape=[1, 16, 16], num_classes=3, train_size=1024, test_size=256,
                    noise=0.15, seed=0)
    idx = train["indices"][:16].tolist()
    x = torch.stack([ds[i][0] for i in idx])
    y = torch.tensor([ds[i][1] for i in idx])
    assert certified_correct(cert.eval(), x, y, EPS, "IBP").tolist() == (train["labels"][:16] == 1).tolist()
    # initialised from the cert-net: every tensor but the head equal when training starts
    cert_state = torch.load(run_dir / "cert" / "cert.pt", weights_only=True)
    head = final_linear_name(cert)
    for k, v in cap.state.items():
        if not k.startswith(head + "."):
            assert torch.equal(v, cert_state[k]), k
    assert cap.state[f"{head}.weight"].shape == (1, cert_state[f"{head}.weight"].shape[1])
    # exported weights and metrics
    gate = build_net(manifest["net"], info)
    assert manifest["net"]["kind"] == "gate"
    gate.load_state_dict(torch.load(gate_dir / manifest["outputs"]["weights"]["path"], weights_only=True))
    m = manifest["metrics"]
    for key in ("test/gate_acc", "test/certified_selection_rate", "test/false_selection_rate",
                "test/dead_units", "test/collapsed_rate", "best_val/selection_score"):
        assert 0.0 <= m[key] <= 1.0 or key == "best_val/selection_score", key
    assert m["test/selection_score"] == pytest.approx(m["test/certified_selection_rate"]
                                                      - m["test/false_selection_rate"], abs=1e-6)
    assert any(r.get("train/pos_weight") for r in rows) and any(r.get("val/selection_score") for r in rows)

    # a re-configured rerun (overwrite moves the old folder away) reuses the cached labels
    def no_certification(*a, **k):
        raise AssertionError("labels were recomputed")

    monkeypatch.setattr(gate_labels, "certify_dataset", no_certification)
    again = run_stage(compose_cfg(runs, GATE + ["stage.kappa_end=0.25", "overwrite=true"]))
    assert "gate labels: reused cached" in capsys.readouterr().out
    assert again["labels"]["source"] == "cache" and again["labels"]["train"] == bal


def test_train_last_k_keeps_the_cert_body(runs):
    manifest = run_stage(compose_cfg(runs, GATE + ["stage.train_last_k=1"]))
    gate = torch.load(runs / "run" / "gate" / "gate.pt", weights_only=True)
    cert = torch.load(runs / "run" / "cert" / "cert.pt", weights_only=True)
    head = final_linear_name(build_net(manifest["net"], _info()))
    body = [k for k in gate if not k.startswith(head + ".")]
    assert body and all(torch.equal(gate[k], cert[k]) for k in body)


def test_a_gate_of_another_architecture_trains_from_scratch_when_asked(runs):
    """init_from_cert=false: any gate architecture (here a fully connected one) is allowed."""
    manifest = run_stage(compose_cfg(runs, GATE + ["stage.gate_net={name: fc, kind: cert, hidden: 50}",
                                                   "stage.init_from_cert=false"]))
    assert manifest["status"] == "complete" and manifest["net"]["name"] == "fc"
    gate = torch.load(runs / "run" / "gate" / "gate.pt", weights_only=True)
    assert gate[final_linear_name(build_net(manifest["net"], _info())) + ".weight"].shape[0] == 1


def test_missing_cert_stage_names_it(tmp_path):
    with pytest.raises(StageInputError, match="needs stage 'cert'"):
        run_stage(compose_cfg(tmp_path, GATE))


def test_cert_weights_that_do_not_fit_the_gate_are_a_clear_error(runs):
    with pytest.raises(ValueError, match="does not match the gate architecture"):
        run_stage(compose_cfg(runs, GATE + ["stage.gate_net={name: fc, kind: cert, hidden: 50}"]))
    assert not any((runs / "run" / "gate").rglob("*.ckpt"))
    # weights replaced after the cert stage wrote its manifest
    torch.save(build_net({"name": "fc", "kind": "cert"}, _info()).state_dict(), runs / "run" / "cert" / "cert.pt")
    with pytest.raises(StageInputError, match="changed after stage 'cert' wrote it"):
        run_stage(compose_cfg(runs, GATE))


def test_labels_made_for_another_eps_are_refused(runs):
    run_stage(compose_cfg(runs, GATE))
    labels = next((runs / "run" / "gate").glob("labels_*.pt"))
    with pytest.raises(StageInputError, match=f"made with eps={EPS:g}, this run uses eps=0.025"):
        run_stage(compose_cfg(runs, GATE + ["eps=0.025", f"stage.labels_file={labels}", "overwrite=true"]))
    # without an explicit file a new eps is simply a new cache key
    other = run_stage(compose_cfg(runs, GATE + ["eps=0.025", "overwrite=true"]))
    assert other["labels"]["source"] == "computed" and other["labels"]["file"].endswith("_eps0.025.pt")


def test_no_certified_input_gives_a_gate_that_selects_nothing(runs):
    with pytest.warns(UserWarning, match="certifies none of the 128 training inputs.*select nothing"):
        # weight decay would move a constant head if its zero steps were taken at the configured lr
        manifest = run_stage(compose_cfg(runs, GATE + ["eps=0.5", "stage.optimizer.weight_decay=0.1"]))
    assert manifest["gate_status"] == "selects_nothing" and manifest["labels"]["train"]["positives"] == 0
    assert manifest["metrics"]["test/selection_rate"] == 0.0
    assert manifest["metrics"]["test/certified_rejection_rate"] == 1.0
    gate = build_net(manifest["net"], _info())
    state = torch.load(runs / "run" / "gate" / "gate.pt", weights_only=True)
    gate.load_state_dict(state)
    head = final_linear_name(gate)
    assert (state[head + ".weight"] == 0).all() and (state[head + ".bias"] == -1e4).all()
    lb, ub = output_bounds(gate.eval(), torch.rand(4, 1, 16, 16), 0.5, "IBP")
    assert (ub < -1e3).all() and (lb == ub).all()


def test_cascade_second_pair_excludes_inputs_taken_by_the_first(runs):
    with pytest.raises(StageInputError, match="needs stage 'gate'"):  # pairs are trained in order
        run_stage(compose_cfg(runs, GATE + ["stage.cascade=[cert,cert]"]))
    first = run_stage(compose_cfg(runs, GATE))
    # pick T_0 between two lower bounds of the first gate, so it takes about half of the inputs
    info = _info()
    gate = build_net(first["net"], info).eval()
    gate.load_state_dict(torch.load(runs / "run" / "gate" / "gate.pt", weights_only=True))
    ds = info.build(str(runs), train=True, input_shape=[1, 16, 16], num_classes=3, train_size=1024,
                    test_size=256, noise=0.15, seed=0)
    first_labels = torch.load(next((runs / "run" / "gate").glob("labels_*.pt")), weights_only=True)
    idx = first_labels["splits"]["train"]["indices"].tolist()
    with torch.no_grad():
        lb, _ = output_bounds(gate, torch.stack([ds[i][0] for i in idx]), EPS, "IBP")
    lb = lb.view(-1).sort().values
    t0 = float(lb[63] + lb[64]) / 2
    second = run_stage(compose_cfg(runs, GATE + ["stage.cascade=[cert,cert]", f"stage.cascade_thresholds=[{t0}]"]))
    assert second["stage"] == "gate_1" and (runs / "run" / "gate_1" / "gate_1.pt").is_file()
    assert second["selection"]["position"] == 1 and second["selection"]["earlier_thresholds"] == [t0]
    assert second["inputs"]["gate"]["sha256"] == first["outputs"]["weights"]["sha256"]
    payload = torch.load(next((runs / "run" / "gate_1").glob("labels_*_after*.pt")), weights_only=True)
    for split, d in payload["splits"].items():
        excluded = d["labels"] == EXCLUDED
        assert int(excluded.sum()) == second["labels"][split]["excluded"]
        assert ((d["labels"] == 1) == (d["cert_ok"] & ~excluded)).all()
    train = payload["splits"]["train"]
    assert train["indices"].tolist() == idx
    assert (train["labels"] == EXCLUDED).sum() == (lb >= t0).sum() == 64  # taken: lb_g0 >= T_0


# -- entropy co-training -----------------------------------------------------------------------------

def test_entropy_stage_fine_tunes_the_cert_net_and_writes_its_manifest(runs):
    manifest = run_stage(compose_cfg(runs, BASE + ["stage=entropy", "stage.epochs=1", "stage.val_pgd_steps=0"]))
    assert manifest["stage"] == "entropy" and manifest["outputs"]["weights"]["path"] == "entropy_cert.pt"
    assert manifest["selection"]["type"] == "entropy" and manifest["selection"]["tau"] == 1.0
    assert manifest["selection"]["threshold"] == -1.0 and manifest["inputs"]["cert"]["stage"] == "cert"
    net = build_net(manifest["net"], _info())
    net.load_state_dict(torch.load(runs / "run" / "entropy" / "entropy_cert.pt", weights_only=True))
    m = manifest["metrics"]
    for key in ("test/cert_acc", "test/certified_selection_rate", "test/selection_rate"):
        assert 0.0 <= m[key] <= 1.0, key
    rows = _rows(runs / "run" / "entropy" / "metrics.csv")
    assert any(r.get("train/entropy_loss") for r in rows)
    with pytest.raises(ValueError, match="lambda"):
        run_stage(compose_cfg(runs, BASE + ["stage=entropy", "stage.lam=1.5"]))


@pytest.mark.parametrize("stage", ["gate", "entropy"])
def test_run_stage_reaches_the_selection_stage_named_by_its_config(stage, tmp_path):
    """A stage is conf/stage/<name>.yaml plus one registry entry: `stage=<name>` composed from the
    real configs and given to run_stage reaches that stage, whose input check names it (nothing
    is trained: the runs folder has no cert stage). A name without an entry is refused."""
    cfg = compose_cfg(tmp_path, BASE + [f"stage={stage}"])
    assert cfg.stage.name == stage
    with pytest.raises(StageInputError, match=f"^stage '{stage}' needs stage 'cert' in "):
        run_stage(cfg)
    assert not (tmp_path / "run" / stage).exists()  # refused before anything is written
    cfg.stage.name = f"{stage}_typo"
    with pytest.raises(ValueError, match=f"unknown stage '{stage}_typo'; known: .*\\b{stage}\\b"):
        run_stage(cfg)


def test_negatives_wrong_leaves_correct_uncertified_inputs_out():
    from ace_lightning.stages.gate_labels import training_labels

    split = {"labels": torch.tensor([1, 0, 0, EXCLUDED, 1], dtype=torch.int8),
             "correct": torch.tensor([True, True, False, True, True])}
    assert training_labels(split).tolist() == [1, 0, 0, EXCLUDED, 1]
    assert training_labels(split, "wrong").tolist() == [1, EXCLUDED, 0, EXCLUDED, 1]
    with pytest.raises(ValueError, match="negatives must be one of uncertified, wrong"):
        training_labels(split, "all")


def test_gate_stage_with_negatives_wrong(runs):
    manifest = run_stage(compose_cfg(runs, GATE + ["stage.negatives=wrong", "overwrite=true"]))
    labels = manifest["labels"]
    payload = torch.load(runs / "run" / "gate" / labels["file"], weights_only=True)
    train = payload["splits"]["train"]
    uncertified_correct = int(((train["labels"] == 0) & train["correct"]).sum())
    assert uncertified_correct > 0, "the tiny cert-net should be right on some uncertified inputs"
    assert labels["train"]["excluded"] == uncertified_correct
    assert labels["train"]["negatives"] == int(((train["labels"] == 0) & ~train["correct"]).sum())
