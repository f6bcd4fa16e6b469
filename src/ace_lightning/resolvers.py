"""The configs' own OmegaConf resolvers, registered when the package is imported: a job's config
is resolved wherever it runs, also in a launcher's worker process before the task function's
modules are loaded (submitit), so the registration cannot wait for config.py."""
from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

from ace_lightning.errors import ConfigError


def seed_suffix(seed: Any) -> str:
    """The run folder's seed part (``run_name: ${data.name}/eps_${eps}${seed_suffix:${seed}}``):
    nothing for seed 0, so the run folders made before seeds were swept stay seed 0's, and
    ``_seed<n>`` otherwise: ``-m seed=0,1,2`` gives three sibling folders, one per seed."""
    try:
        value = int(seed)
    except (TypeError, ValueError):
        raise ConfigError(f"seed must be an integer, got {seed!r}") from None
    return "" if value == 0 else f"_seed{value}"


if not OmegaConf.has_resolver("seed_suffix"):
    OmegaConf.register_new_resolver("seed_suffix", seed_suffix)
