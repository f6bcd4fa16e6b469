"""Every compat patch is needed: the feature it restores works with the patch, and the same feature
fails in a fresh process where only that patch is skipped (patches are process-wide, hence the
subprocess). If a future torch/auto_LiRPA fixes a break, the negative half reports it: the patch
became a no-op and its entry here should be retired."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from ace_lightning.bounds import compat, margin_lower_bounds, output_bounds, robust_ce_loss
from ace_lightning.bounds.lirpa import bounded_module
from ace_lightning.nets.layers import Normalize

# Code that exercises one feature; run after compat.apply(skip=...) in a subprocess.
FEATURES = {
    "import": "import auto_LiRPA",
    "build": textwrap.dedent("""
        from auto_LiRPA import BoundedModule
        BoundedModule(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2)), torch.zeros(1, 1, 2, 2))
    """),
    "register_parameter": textwrap.dedent("""
        from auto_LiRPA import BoundedModule
        bm = BoundedModule(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2)), torch.zeros(1, 1, 2, 2))
        bm.register_parameter("extra", torch.nn.Parameter(torch.zeros(1)))
    """),
    "loss_fusion": textwrap.dedent("""
        from ace_lightning.bounds import robust_ce_loss
        net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        robust_ce_loss(net, torch.rand(2, 1, 2, 2), torch.tensor([0, 2]), 0.1, "CROWN-IBP", loss_fusion=True)
    """),
    "named_parameters": textwrap.dedent("""
        from ace_lightning.bounds.lirpa import bounded_module
        net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
        bm = bounded_module(net, torch.rand(2, 1, 2, 2))
        assert len(list(bm.named_parameters())) == 2
        bm.zero_grad()
    """),
    "patches_normalize": textwrap.dedent("""
        from ace_lightning.bounds import output_bounds
        from ace_lightning.nets.layers import Normalize
        net = torch.nn.Sequential(Normalize([0.5, 0.4], [0.2, 0.3]), torch.nn.Conv2d(2, 4, 3, 1, 1), torch.nn.ReLU(),
                                  torch.nn.Conv2d(4, 4, 3, 1, 1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(64, 3))
        output_bounds(net, torch.rand(3, 2, 4, 4), 0.05, "CROWN")
    """),
    "alpha_tighter": textwrap.dedent("""
        from ace_lightning.bounds import output_bounds
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32),
                                  torch.nn.ReLU(), torch.nn.Linear(32, 3))
        x = torch.full((2, 1, 2, 2), 0.5)
        lc, uc = output_bounds(net, x, 0.3, "CROWN")
        la, ua = output_bounds(net, x, 0.3, "alpha-CROWN")
        assert (la - lc).max() > 1e-3 and (uc - ua).max() > 1e-3, "alpha-CROWN did not tighten CROWN"
    """),
    "avgpool_first": textwrap.dedent("""
        from ace_lightning.bounds import output_bounds
        from ace_lightning.nets.layers import Normalize
        net = torch.nn.Sequential(torch.nn.AvgPool2d(2), Normalize([0.5], [0.2]), torch.nn.Conv2d(1, 2, 3, 1, 1),
                                  torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8, 3))
        output_bounds(net, torch.rand(2, 1, 4, 4), 0.3, "CROWN")  # eps 0.05 left every ReLU stable on some draws
    """),
    "eval_grad": textwrap.dedent("""
        from ace_lightning.bounds import margin_lower_bounds
        net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()
        lb = margin_lower_bounds(net, torch.rand(2, 1, 2, 2), torch.tensor([0, 1]), 0.1, "IBP")
        assert lb.requires_grad and all(p.requires_grad for p in net.parameters())
    """),
}

# patch -> the feature that breaks without it
NEEDED_FOR = {
    "numpy_arraysetops": "import",
    "set_opset_version": "import",
    "torch_six": "register_parameter",
    "node_getitem": "build",
    "symbolic_registration": "loss_fusion",
    "named_members": "named_parameters",
    "patches_channel_const": "patches_normalize",
    "relu_alpha_clamp": "alpha_tighter",
    "params_requires_grad": "eval_grad",
    "avgpool_noncontiguous": "avgpool_first",
}


def _run(feature: str, skip: tuple[str, ...]) -> subprocess.CompletedProcess:
    code = (
        "import warnings; warnings.simplefilter('ignore')\n"
        "import torch\n"
        "torch.manual_seed(0)\n"  # the same nets and inputs every run (features must not be flaky)
        "from ace_lightning.bounds import compat\n"
        "compat.apply()\n" + FEATURES[feature]
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env[compat.SKIP_ENV] = ",".join(skip)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=300)


def test_every_patch_has_a_feature():
    assert set(NEEDED_FOR) == set(compat.PRE_IMPORT) | set(compat.POST_IMPORT)


@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_feature_works_with_all_patches(feature):
    result = _run(feature, ())
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("patch", sorted(NEEDED_FOR))
def test_feature_fails_without_patch(patch):
    if not compat.APPLIED.get(patch):
        pytest.skip(f"{patch}: not needed on this torch/auto_LiRPA (the thing it restores exists)")
    result = _run(NEEDED_FOR[patch], (patch,))
    assert result.returncode != 0, f"{NEEDED_FOR[patch]} worked without patch {patch}"


def test_apply_is_idempotent_and_rejects_unknown_names():
    before = dict(compat.APPLIED)
    assert compat.apply() == before
    with pytest.raises(ValueError, match="unknown compat patch"):
        compat.apply(skip=("no_such_patch",))


def test_minimum_sparsity_option_avoids_dense_alpha_crash():
    """Patch 9 is an option: 0.3's default (0.9) crashes alpha-CROWN when >90% of a layer is
    unstable; the bound layer builds every BoundedModule with minimum_sparsity=1.0."""
    import numpy as np
    from auto_LiRPA import BoundedModule, BoundedTensor
    from auto_LiRPA.perturbations import PerturbationLpNorm

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, 1, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, 1, 1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(128, 3))
    x = torch.full((2, 1, 4, 4), 0.5)
    ptb = PerturbationLpNorm(norm=np.inf, eps=0.5, x_L=torch.zeros_like(x), x_U=torch.ones_like(x))
    legacy = BoundedModule(net, x[:1], bound_opts={"minimum_sparsity": 0.9})
    with pytest.raises(RuntimeError, match="shape mismatch"):
        legacy.compute_bounds(x=(BoundedTensor(x, ptb),), method="CROWN-Optimized")
    lb, ub = output_bounds(net, x, 0.5, "alpha-CROWN")
    assert torch.isfinite(lb).all() and (lb <= ub).all()


def test_frozen_parameters_stay_frozen_in_train_mode():
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).train()
    for p in net.parameters():
        p.requires_grad_(False)
    margin_lower_bounds(net, torch.rand(2, 1, 2, 2), torch.tensor([0, 1]), 0.1, "CROWN-IBP")
    assert not any(p.requires_grad for p in net.parameters())


def test_named_parameters_of_bounded_module_are_the_users():
    net = nn.Sequential(Normalize([0.5], [0.5]), nn.Flatten(), nn.Linear(4, 2))
    bm = bounded_module(net, torch.rand(2, 1, 2, 2))
    assert {id(p) for _, p in bm.named_parameters()} == {id(p) for p in net.parameters()}
    assert robust_ce_loss(net, torch.rand(2, 1, 2, 2), torch.tensor([0, 1]), 0.1).requires_grad
