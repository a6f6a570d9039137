"""tp_loader: load Hugging Face checkpoints straight into tensor-parallel DTensor shards."""

from .errors import (
    CheckpointError,
    DistributedError,
    ModelNotFoundError,
    PlanError,
    ReadError,
    ShardingError,
    StrictLoadError,
    TPLoaderError,
)
from .loader import LoadResult, load
from .report import LoadReport

__all__ = [
    "load",
    "LoadResult",
    "LoadReport",
    "TPLoaderError",
    "CheckpointError",
    "ModelNotFoundError",
    "PlanError",
    "ShardingError",
    "StrictLoadError",
    "ReadError",
    "DistributedError",
]
__version__ = "0.1.0"
