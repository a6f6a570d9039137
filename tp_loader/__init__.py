"""tp_loader: load Hugging Face checkpoints straight into tensor-parallel DTensor shards.

The public functions are imported on first use (``tp_loader.load`` imports the pipeline and
``torch.distributed.tensor``), so ``import tp_loader`` and ``python -m tp_loader --help`` stay cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .errors import (
    ArgumentError,
    CheckpointError,
    DistributedError,
    ModelNotFoundError,
    PlanError,
    ReadError,
    ShardingError,
    StaleShardsError,
    StrictLoadError,
    TPLoaderError,
)

if TYPE_CHECKING:
    from .dryrun import plan_load
    from .into import load_into
    from .loader import LoadResult, load
    from .parallel import parallelize
    from .report import LoadReport, PlanSummary

#: Public name → the module that defines it, imported when the name is first used.
_LAZY = {
    "load": "loader",
    "LoadResult": "loader",
    "load_into": "into",
    "parallelize": "parallel",
    "plan_load": "dryrun",
    "LoadReport": "report",
    "PlanSummary": "report",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'tp_loader' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


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
    "StaleShardsError",
    "StrictLoadError",
    "ReadError",
    "DistributedError",
]
