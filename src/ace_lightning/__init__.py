"""ace-lightning: ACE (Certify or Predict, ICLR 2021) on PyTorch Lightning + Hydra."""

__version__ = "0.1.0"
