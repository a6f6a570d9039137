"""tp_loader: load Hugging Face checkpoints straight into tensor-parallel DTensor shards."""

from ._version import __version__
from .dryrun import plan_load
from .errors import (
    ArgumentError,
    CheckpointError,
    DistributedError,
    ModelNotFoundError,
    PlanError,
    ReadError,
    ShardingError,
    StrictLoadError,
    TPLoaderError,
)
from .into import load_into
from .loader import LoadResult, load
from .parallel import parallelize
from .report import LoadReport, PlanSummary

__all__ = [
    "__version__",
    "load",
    "load_into",
    "parallelize",
    "plan_load",
    "LoadResult",
    "LoadReport",
    "PlanSummary",
    "TPLoaderError",
    "ArgumentError",
    "CheckpointError",
    "ModelNotFoundError",
    "PlanError",
    "ShardingError",
    "StrictLoadError",
    "ReadError",
    "DistributedError",
]
