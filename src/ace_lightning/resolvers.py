"""The configs' own OmegaConf resolvers, registered when the package is imported: a job's config
is resolved wherever it runs, also in a launcher's worker process before the task function's
modules are loaded (submitit), so the registration cannot wait for config.py."""
from __future__ import annotations

from typing import Any, Optional

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


def job_num() -> Optional[int]:
    """The Hydra job's number in its sweep; None for a single run and where no Hydra job runs."""
    try:
        from hydra.core.hydra_config import HydraConfig

        num = OmegaConf.select(HydraConfig.get(), "job.num")  # MISSING (None) outside a sweep
    except ValueError:  # HydraConfig not set (a config composed by a test)
        return None
    return None if num is None else int(num)


def trial_folder() -> str:
    """A search's trial folder (``run_name: search_fmnist/eps_${eps}/${trial_folder:}``): ``trial_<n>``
    for job n of a sweep (the sweeper's trial n: its own run folder), ``single`` otherwise."""
    num = job_num()
    return "single" if num is None else f"trial_{num}"


if not OmegaConf.has_resolver("seed_suffix"):
    OmegaConf.register_new_resolver("seed_suffix", seed_suffix)
if not OmegaConf.has_resolver("trial_folder"):
    OmegaConf.register_new_resolver("trial_folder", trial_folder)
