"""What the training stages share beyond the run folder (ace_lightning.rundir): the L1 penalty."""
from __future__ import annotations

import torch
from torch import nn


def l1_penalty(net: nn.Module) -> torch.Tensor:
    """Sum of |w| over conv and linear weights (docs/METHOD.md section 6, factor applied by caller)."""
    terms = [m.weight.abs().sum() for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return torch.stack(terms).sum() if terms else torch.zeros(())
