"""Training stages (one LightningModule each) and the registry the CLI dispatches on. Stages never
import each other: they meet through the run folder's manifests and exported weights."""
from ace_lightning.stages.registry import STAGES, run_stage

__all__ = ["STAGES", "run_stage"]
