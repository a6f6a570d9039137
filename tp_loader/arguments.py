"""The public functions' arguments, normalised and checked before any process group or I/O.

``dtype`` and ``device`` come as strings from the command line or as torch objects from callers; both
become torch objects here or fail with an :class:`ArgumentError` that says what is accepted.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ArgumentError, short_repr

#: The dtypes a load may convert floating-point weights to, by every name accepted for them.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
}
#: fp8 dtypes are accepted only to keep fp8 weights as stored: tp_loader never quantizes.
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
_ACCEPTED = "float32 (fp32, float), bfloat16 (bf16), float16 (fp16, half), or an fp8 dtype to keep fp8 weights"


def normalise_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """The torch dtype for ``dtype``: a torch dtype or one of the names in :data:`DTYPES`.

    Raises:
        ArgumentError: an unknown name, or a dtype that would destroy the weights (integers, bool,
            complex, float64 and other types tp_loader does not convert to).
    """
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
        name = str(dtype).removeprefix("torch.")
    else:
        name = str(dtype).strip().lower().removeprefix("torch.")
        if name in DTYPES:
            return DTYPES[name]
    raise ArgumentError(
        f"dtype {name!r} is not one tp_loader loads weights as",
        key="dtype",
        hint=f"Use {_ACCEPTED}; or no dtype to keep every tensor as stored",
    )


def conversion_dtype(dtype: torch.dtype | None) -> torch.dtype | None:
    """What floating-point tensors are converted to: ``None`` for no dtype and for an fp8 dtype, which
    keeps every tensor as stored."""
    return None if dtype in FP8_DTYPES else dtype


def dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def normalise_device(device: str | torch.device | None, local_rank: int) -> torch.device | None:
    """The device shards go to: ``cpu``, or ``cuda`` (``cuda`` alone means ``cuda:LOCAL_RANK``).

    Raises:
        ArgumentError: an unparsable device, a device type other than cpu or cuda, CUDA asked for
            where torch sees no CUDA device, or a CUDA index beyond the visible devices.
    """
    if device is None:
        return None
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ArgumentError(
            f"device {str(device)!r} is not a device", key="device", hint="Use cpu, cuda or cuda:N"
        ) from None
    if target.type == "cpu":
        return torch.device("cpu")
    if target.type != "cuda":
        raise ArgumentError(
            f"device {str(device)!r}: tp_loader places shards on cpu or cuda, not {target.type}",
            key="device",
            hint="Use cpu, cuda or cuda:N",
        )
    if not torch.cuda.is_available():
        build = f"a CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build of torch"
        raise ArgumentError(
            f"device {str(device)!r} asked for, but torch sees no CUDA device ({build})",
            key="device",
            hint="Load with --device cpu, or run where a GPU is visible with a CUDA build of torch",
        )
    count = torch.cuda.device_count()
    index = local_rank % count if target.index is None else target.index
    if index >= count:
        raise ArgumentError(
            f"device {str(device)!r}: only {count} CUDA devices are visible",
            key="device",
            hint=f"Use cuda (cuda:LOCAL_RANK) or cuda:0 to cuda:{count - 1}",
        )
    return torch.device("cuda", index)


def check_writable(path: str | os.PathLike[str], *, what: str) -> Path:
    """Checks that a file can be written at ``path`` (its missing parent folders can be made), without
    writing anything.

    Raises:
        ArgumentError: naming the path and the reason.
    """
    target = Path(path).expanduser()
    reason = None
    if target.is_dir():
        reason = "it is a directory"
    elif target.exists():
        if not target.is_file():
            reason = "it is not a regular file"
        elif not os.access(target, os.W_OK):
            reason = "it is not writable"
    else:
        ancestor = target.parent
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            reason = f"{ancestor} is not a directory"
        elif not os.access(ancestor, os.W_OK | os.X_OK):
            reason = f"directory {ancestor} is not writable"
    if reason is not None:
        raise ArgumentError(
            f"cannot write the {what} to {target}: {reason}",
            file=str(target),
            hint="Pass a path in a writable directory",
        )
    return target


def write_file(path: str | os.PathLike[str], text: str, *, what: str) -> None:
    """Writes ``text`` to ``path``, making its missing parent folders.

    Raises:
        ArgumentError: the write fails, naming the path.
    """
    target = Path(path).expanduser()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    except OSError as exc:
        raise ArgumentError(
            f"cannot write the {what}: {exc}", file=str(target), hint="Pass a path in a writable directory"
        ) from None


@dataclass(frozen=True)
class Fingerprint:
    """The arguments every rank of one load must pass alike (ranks compare them before any I/O)."""

    dtype: str | None
    plan: str
    mode: str | None
    strict: bool
    allow_unmatched: bool
    zero_copy: bool
    device_type: str
    share: str = "none"
    keep: tuple[str, ...] = ()

    def differences(self, other: Fingerprint) -> list[str]:
        """``name=mine vs theirs`` for each argument that differs."""
        return [
            f"{name}={getattr(self, name)!r} vs {getattr(other, name)!r}"
            for name in self.__dataclass_fields__
            if getattr(self, name) != getattr(other, name)
        ]


def normalise_keep(keep: str | Sequence[str] | None) -> tuple[str, ...]:
    """``keep=``: one name or glob, or several, as a tuple.

    Raises:
        ArgumentError: an entry is not a non-empty string.
    """
    if keep is None:
        return ()
    entries = (keep,) if isinstance(keep, str) else tuple(keep) if isinstance(keep, Sequence) else None
    if entries is None or not all(isinstance(k, str) and k for k in entries):
        raise ArgumentError(
            f"keep={short_repr(keep)} is not a list of skip-entry names or key globs",
            key="keep",
            hint="Pass keep=['mtp'] (a [[skip]] entry's name) or globs of keys, e.g. keep=['model.layers.61.**']",
        )
    return entries


#: What ``share=`` accepts: each replica reads for itself, or the replicas split the reading.
SHARE_MODES = ("none", "job")


def normalise_share(share: str, device: torch.device | None) -> str:
    """Checks ``share=``.

    Raises:
        ArgumentError: an unknown mode, or ``"job"`` for CUDA shards (the exchange runs over gloo on CPU
            tensors; not built for CUDA yet).
    """
    if share not in SHARE_MODES:
        raise ArgumentError(
            f"share={share!r} is not one of {list(SHARE_MODES)}",
            hint="share='none' (every replica reads for itself) or 'job' (the replicas split the reading)",
        )
    if share == "job" and device is not None and device.type != "cpu":
        raise ArgumentError(
            f"share='job' exchanges CPU tensors over gloo; shards on {device.type} are not supported yet",
            hint="Load with share='none' on GPUs, or with device='cpu' and move the shards",
        )
    return share
