"""The training stages: one LightningModule each (core, cert, gate, entropy) and the skeleton that
trains one (runner.py). Stages never import each other: they meet through the run folder
(ace_lightning.rundir). The registry that dispatches on stage names lives above them
(ace_lightning.registry)."""
