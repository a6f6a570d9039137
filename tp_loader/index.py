"""Stage 2, index: what tensors does the checkpoint hold, and where are their bytes?

Only headers are read here: for safetensors, the 8-byte length and the JSON header of each file,
validated against the file size before anything trusts them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CheckpointError
from .resolve import WeightFiles, read_config

logger = logging.getLogger("tp_loader")

MAX_HEADER_BYTES = 100 * 1024 * 1024

#: safetensors dtype name → torch dtype.
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where one stored tensor lives.

    Attributes:
        key: checkpoint key.
        file: file name relative to the checkpoint directory.
        dtype: torch dtype as stored.
        shape: stored shape.
        begin: absolute byte offset of the first element in ``file`` (``-1`` for ``.bin`` files).
        end: absolute byte offset one past the last element (``-1`` for ``.bin`` files).
        stored_key: for a converter's target, the stored tensor it is carved from (else ``key``).
        row_offset: for a converter's target, its first row (dim 0) in ``stored_key``.
        segments: for a converter's target built from several stored tensors (or reshaped or
            permuted), the pieces it is made of, concatenated along dim 0; empty for a tensor whose
            bytes are one run of its file.
    """

    key: str
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int = -1
    end: int = -1
    stored_key: str = ""
    row_offset: int = 0
    segments: tuple[Segment, ...] = ()

    @property
    def source_key(self) -> str:
        """The key under which the bytes are stored in the file."""
        return self.stored_key or self.key

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class Segment:
    """One piece of a converter target: a stored tensor (or a run of its rows), concatenated with the
    target's other pieces along dim 0.

    Attributes:
        info: where the piece's bytes are.
        lead: ``1`` when the piece gains a leading dimension of 1 in the target (experts stacked),
            ``-1`` when it loses one (a stacked tensor split per expert), ``0`` otherwise.
        rope_head_dim: when non-zero, the piece's rows are permuted within each head of this size
            between the interleaved and the half-split rotary layouts.
        rope_to_half: the permutation's direction: interleaved → half-split (else the reverse).
    """

    info: TensorInfo
    lead: int = 0
    rope_head_dim: int = 0
    rope_to_half: bool = True

    @property
    def rows(self) -> int:
        """The rows (target dim 0) this piece covers."""
        shape = self.info.shape
        return 1 if self.lead == 1 else shape[1] if self.lead == -1 else shape[0]


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint as seen through its headers.

    Attributes:
        root: the checkpoint directory.
        format: ``"safetensors"`` or ``"pickle"``.
        config: the parsed ``config.json``.
        tensors: checkpoint key → :class:`TensorInfo`, in file and offset order.
    """

    root: Path
    format: str
    config: dict
    tensors: dict[str, TensorInfo]

    def fingerprint(self) -> str:
        """A digest of every key, file, dtype, shape and byte range: equal on ranks that see the same checkpoint."""
        digest = hashlib.sha256(json.dumps(self.config, sort_keys=True, default=str).encode())
        for info in self.tensors.values():
            digest.update(f"{info.key}|{info.file}|{info.dtype}|{info.shape}|{info.begin}|{info.end}\n".encode())
        return digest.hexdigest()


def index_checkpoint(weights: WeightFiles) -> Checkpoint:
    """Reads the config and every weight file's header, and cross-checks them with the index.

    Raises:
        CheckpointError: a header is malformed or inconsistent with its file, a key is stored twice,
            or the index disagrees with the headers.
    """
    config = read_config(weights.root)
    read_file = read_safetensors_header if weights.format == "safetensors" else read_pickle_header
    tensors: dict[str, TensorInfo] = {}
    for name in weights.files:
        for info in read_file(weights.root, name):
            if info.key in tensors:
                raise CheckpointError(
                    f"key is stored twice, in {tensors[info.key].file} and {name}",
                    file=str(weights.root / name),
                    key=info.key,
                    hint="Remove the duplicate or fix the index",
                )
            tensors[info.key] = info
    if weights.weight_map is not None:
        _check_weight_map(weights, tensors)
    return Checkpoint(weights.root, weights.format, config, tensors)


def _check_weight_map(weights: WeightFiles, tensors: dict[str, TensorInfo]) -> None:
    index_path = str(weights.root / str(weights.index))
    assert weights.weight_map is not None
    for key, name in weights.weight_map.items():
        info = tensors.get(key)
        if info is None or info.file != name:
            raise CheckpointError(
                f"index maps the key to {name}, but that file's header has no such tensor",
                file=index_path,
                key=key,
                hint="The index and the weight files disagree: re-download or regenerate the index",
            )
    for key, info in tensors.items():
        if key not in weights.weight_map:
            raise CheckpointError(
                f"{info.file} stores a tensor that the index does not list",
                file=index_path,
                key=key,
                hint="The index and the weight files disagree: re-download or regenerate the index",
            )


def read_safetensors_header(root: Path, name: str) -> list[TensorInfo]:
    """Parses and validates one safetensors header without touching tensor data.

    Returns:
        The file's tensors in byte-offset order.

    Raises:
        CheckpointError: missing or truncated file, bad JSON, unknown dtype, or byte ranges that do not
            match shapes, overlap, leave holes or run past the end of the file.
    """
    path = root / name
    try:
        with open(path, "rb") as handle:
            size = handle.seek(0, 2)
            handle.seek(0)
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise _bad(path, "file is shorter than the 8-byte header length")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise _bad(
                    path,
                    f"header length {header_len} does not fit the file of {size} bytes (truncated or not safetensors)",
                )
            raw = handle.read(header_len)
    except FileNotFoundError:
        raise CheckpointError(
            "weight file does not exist", file=str(path), hint="Re-download the checkpoint; the index names this file"
        ) from None
    except OSError as exc:
        raise CheckpointError(
            f"cannot read weight file: {exc}", file=str(path), hint="Check the file's permissions and the filesystem"
        ) from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad(path, f"header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise _bad(path, "header is not a JSON object")
    data_start = 8 + header_len
    data_size = size - data_start
    infos = [
        _parse_entry(path, name, key, entry, data_start, data_size)
        for key, entry in header.items()
        if key != "__metadata__"
    ]
    infos.sort(key=lambda info: (info.begin, info.end))
    cursor = data_start
    for info in infos:
        if info.begin != cursor:
            what = "overlaps the previous tensor" if info.begin < cursor else "leaves a gap before it"
            raise _bad(path, f"byte range [{info.begin - data_start}, {info.end - data_start}) {what}", key=info.key)
        cursor = info.end
    if cursor != size:
        raise _bad(path, f"{size - cursor} bytes after the last tensor are not described by the header")
    return infos


def _parse_entry(path: Path, name: str, key: str, entry: object, data_start: int, data_size: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise _bad(path, "header entry is not an object", key=key)
    dtype = DTYPES.get(entry.get("dtype"))  # type: ignore[arg-type]
    if dtype is None:
        raise _bad(path, f"unknown dtype {entry.get('dtype')!r}; known: {', '.join(DTYPES)}", key=key)
    shape = entry.get("shape")
    offsets = entry.get("data_offsets")
    if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise _bad(path, f"shape {shape!r} is not a list of non-negative integers", key=key)
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise _bad(path, f"data_offsets {offsets!r} is not a pair of integers", key=key)
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise _bad(
            path, f"data_offsets [{begin}, {end}) fall outside the {data_size} data bytes (truncated file?)", key=key
        )
    expected = math.prod(shape) * dtype.itemsize
    if end - begin != expected:
        raise _bad(
            path,
            f"shape {shape} of {entry['dtype']} needs {expected} bytes but data_offsets span {end - begin}",
            key=key,
        )
    return TensorInfo(key, name, dtype, tuple(shape), data_start + begin, data_start + end)


def read_pickle_header(root: Path, name: str) -> list[TensorInfo]:
    """Indexes a ``.bin`` file by memory-mapping it with ``weights_only=True`` (no code is ever executed).

    Raises:
        CheckpointError: the file is missing, is not a torch checkpoint, or needs code execution to load.
    """
    state = load_pickle(root / name)
    return [TensorInfo(key, name, tensor.dtype, tuple(tensor.shape)) for key, tensor in state.items()]


def load_pickle(path: Path) -> dict[str, torch.Tensor]:
    """Memory-maps a ``.bin`` state dict with ``weights_only=True``.

    Raises:
        CheckpointError: as :func:`read_pickle_header`.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise CheckpointError(
            "weight file does not exist", file=str(path), hint="Re-download the checkpoint; the index names this file"
        ) from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, AttributeError) as exc:
        raise CheckpointError(
            "refused or could not read the .bin file with weights_only=True: "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
            file=str(path),
            hint="tp_loader never executes code from checkpoints; convert the model to safetensors",
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(
            ".bin file does not hold a flat state dict of tensors",
            file=str(path),
            hint="Convert the model to safetensors",
        )
    return state


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of ``dtype`` (``BF16``), or torch's name for dtypes safetensors lacks."""
    return _NAMES.get(dtype, str(dtype).removeprefix("torch."))


def _bad(path: Path, what: str, key: str | None = None) -> CheckpointError:
    return CheckpointError(
        f"malformed safetensors header: {what}",
        file=str(path),
        key=key,
        hint="The file is corrupt or truncated: re-download it",
    )
