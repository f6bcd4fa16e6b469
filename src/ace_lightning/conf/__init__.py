"""Hydra configs, shipped inside the package (``pkg://ace_lightning.conf``)."""
