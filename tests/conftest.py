"""Test-wide settings: one torch thread (two cores are shared with other processes; OpenMP
spin-waiting made 2-thread torch 65x slower under contention), wandb never online."""
import os

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
