"""Datasets: one registry (name -> loader, shape, classes, mean/std, augmentation) and one
LightningDataModule. Every dataset yields (float image in [0, 1] of shape (C, H, W), int label)."""
from ace_lightning.data.datamodule import ACEDataModule
from ace_lightning.data.errors import DatasetNotFoundError
from ace_lightning.data.registry import DATASETS, DatasetInfo, get_dataset_info

__all__ = ["ACEDataModule", "DATASETS", "DatasetInfo", "DatasetNotFoundError", "get_dataset_info"]
