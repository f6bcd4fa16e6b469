"""The training stages: one module group each (core, cert, gate, entropy) declaring its Stage (a
typed config, what it reads from the run folder, its LightningModule), and the runner that trains
any Stage (runner.py). Stages never import each other: they meet through the run folder
(ace_lightning.rundir). The registry that maps stage names to Stages lives above them
(ace_lightning.registry)."""
