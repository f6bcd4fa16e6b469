"""Framework overhead: one cert-stage training step inside Lightning vs a bare hand-written loop
doing the same auto_LiRPA calls on the same batch (goal: at most 1.1x).

Both loops run the same number of steps on the same fixed batch; the per-step time is the median
gap between consecutive batch starts (so Lightning's loop, hooks, logging and optimizer wrapper are
all inside it), after warm-up. On a CUDA device the bare loop moves the batch to the device each
step as Lightning does, the Trainer runs with accelerator="gpu", and each stamp waits for the
device (``timing.clock``) so that the gap holds the step's GPU work, not just its launch.
"""
from __future__ import annotations

import statistics

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ace_lightning.bounds import robust_ce_loss
from ace_lightning.nets import create_cert_net
from ace_lightning.stages.cert import CertConfig, CertStage
from ace_lightning.stages.common import l1_penalty
from timing import clock, peak_memory, reset_peak


class _SameBatch(Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor, n: int) -> None:
        self.x, self.y, self.n = x, y, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return self.x, self.y


class _Stamps(L.Callback):
    def __init__(self, device: torch.device) -> None:
        self.t: list[float] = []
        self.device = device

    def on_train_batch_start(self, *args, **kwargs) -> None:
        self.t.append(clock(self.device))


def _median_gap(stamps: list[float], warmup: int) -> float:
    gaps = [b - a for a, b in zip(stamps, stamps[1:])][warmup:]
    return statistics.median(gaps)


def measure(name: str = "small", shape=(1, 28, 28), classes: int = 10, batch: int = 128,
            eps: float = 0.1, steps: int = 12, warmup: int = 3, method: str = "IBP",
            device: torch.device | str = "cpu") -> dict:
    device = torch.device(device)
    torch.manual_seed(0)
    x = torch.rand(batch, *shape)
    y = torch.randint(0, classes, (batch,))
    c = shape[0]
    opt_cfg = {"name": "adam", "lr": 1e-4}

    # bare loop: exactly the cert stage's loss on the same batch
    net = create_cert_net(name, shape, classes, [0.5] * c, [0.25] * c).to(device).train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    eps_t = eps * 1.05
    stamps = []
    reset_peak(device)
    for _ in range(steps + 1):
        stamps.append(clock(device))
        xb, yb = x.to(device), y.to(device)
        opt.zero_grad(set_to_none=True)
        robust, logits = robust_ce_loss(net, xb, yb, eps_t, method, return_logits=True)
        loss = 0.5 * nn.functional.cross_entropy(logits, yb) + 0.5 * robust + 1e-5 * l1_penalty(net)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 10.0)
        opt.step()
    bare = _median_gap(stamps, warmup)
    bare_peak = peak_memory(device)
    reset_peak(device)

    # the same inside Lightning: eps at eps_train from step 0 (no warm-up, no ramp)
    net = create_cert_net(name, shape, classes, [0.5] * c, [0.25] * c)
    config = CertConfig.from_dict({"optimizer": opt_cfg, "lr_schedule": {}, "method": method, "warmup_epochs": 0,
                                   "ramp_epochs": 0, "kappa_end": 0.5, "l1": 1e-5, "steps_per_epoch": steps + 1,
                                   "val_pgd_steps": 0}, eps)
    module = CertStage(net, config, eps)
    stamp_cb = _Stamps(device)
    on_gpu = device.type == "cuda"
    trainer = L.Trainer(max_steps=steps + 1, accelerator="gpu" if on_gpu else "cpu",
                        devices=[torch.cuda.current_device() if device.index is None else device.index] if on_gpu else 1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, gradient_clip_val=10.0, callbacks=[stamp_cb],
                        limit_val_batches=0, num_sanity_val_steps=0)
    loader = DataLoader(_SameBatch(x, y, steps + 1), batch_size=None, shuffle=False)
    trainer.fit(module, train_dataloaders=loader)
    lightning = _median_gap(stamp_cb.t, warmup)
    return {"net": name, "shape": list(shape), "batch": batch, "method": method,
            "bare_loop_step_s": bare, "lightning_step_s": lightning,
            "ratio_lightning_to_bare": lightning / bare, "steps_measured": steps - warmup,
            "device": str(device),
            **{f"bare_{k}": v for k, v in bare_peak.items()},
            **{f"lightning_{k}": v for k, v in peak_memory(device).items()}}


if __name__ == "__main__":
    import json

    print(json.dumps(measure(), indent=2))
