"""The one error a missing or malformed dataset raises (defined with the other user errors)."""
from ace_lightning.errors import DatasetNotFoundError

__all__ = ["DatasetNotFoundError"]
