"""ace-lightning: ACE (Certify or Predict, ICLR 2021) on PyTorch Lightning + Hydra."""

__version__ = "0.2.0"

# the console's cheap part (no import, no I/O): the package logger's one handler, Lightning's lines
# printed once and without its advertisements, the warning filters; entry points also call
# ace_lightning.console.setup_console() (see console.py)
from ace_lightning import console as _console  # noqa: E402

_console.install()

# the configs' own resolver (${seed_suffix:${seed}} in run_name) must exist wherever a job's config
# is resolved, also in a launcher's worker process before the task function runs (submitit)
from ace_lightning import resolvers as _resolvers  # noqa: E402,F401
