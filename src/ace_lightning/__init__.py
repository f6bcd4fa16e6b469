"""ace-lightning: ACE (Certify or Predict, ICLR 2021) on PyTorch Lightning + Hydra."""

__version__ = "0.2.0"

# the console's cheap part (no import, no I/O): the package logger's one handler, Lightning's lines
# printed once and without its advertisements, the warning filters; entry points also call
# ace_lightning.console.setup_console() (see console.py)
from ace_lightning import console as _console  # noqa: E402

_console.install()
