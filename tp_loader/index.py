"""Stage 2, index: what tensors does the checkpoint hold, and where are their bytes?

Only headers are read here: for safetensors, the 8-byte length and the JSON header of each file,
validated against the file size before anything trusts them.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import logging
import math
import pickle
import re
import struct
import sys
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import CheckpointError, short_repr, short_text
from .resolve import (
    SAFETENSORS_INDEX,
    WeightFiles,
    check_regular,
    count_json_values,
    decode_json,
    parse_json,
    read_config,
)

logger = logging.getLogger("tp_loader")

#: The most bytes a safetensors header may have (safetensors' own bound is 100 MB).
MAX_HEADER_BYTES = 100 * 1024 * 1024
#: The most JSON values a header may hold, counted before it is parsed as the commas, colons and opening
#: brackets of its bytes (each value is a Python object once parsed). A tensor's entry is 11 to 14 of them, so
#: this is about 360,000 tensors in one file: DeepSeek-V3's 91,991 tensors come in 163 files of at most about
#: 600, and one pre-sharded rank file of it at TP 8 holds 90,427. The worst header within both bounds peaks under
#: 700 MiB of RSS while refused; the 80 MB header of a million empty tensors is refused before it is parsed
#: (docs/guarantees.md).
MAX_HEADER_VALUES = 4_000_000
#: The most bytes a header's text may take in memory: twice the bytes cap (a header of characters beyond U+FFFF
#: takes four bytes a character, and its parse as much again).
MAX_HEADER_TEXT_BYTES = 2 * MAX_HEADER_BYTES
#: The largest dimension, and the largest running product of dimensions, a header may give (safetensors' usize).
MAX_DIM = 2**64 - 1
_VALUES_PER_TENSOR = 11

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
        file_sizes: each weight file's size when its header was read; the read stage refuses a file
            that has shrunk since.
    """

    root: Path
    format: str
    config: dict
    tensors: dict[str, TensorInfo]
    file_sizes: dict[str, int] = field(default_factory=dict)

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
    per_file = {name: read_file(weights.root, name) for name in weights.files}
    if weights.weight_map is None:
        per_file = _without_covered_copies(weights.root, per_file)
    tensors: dict[str, TensorInfo] = {}
    file_sizes: dict[str, int] = {}
    for name, infos in per_file.items():
        file_sizes[name] = (weights.root / name).stat().st_size
        for info in infos:
            if info.key in tensors:
                first = tensors[info.key].file
                copy = next((n for n in (first, name) if _CONSOLIDATED.fullmatch(n)), None)
                raise CheckpointError(
                    f"key is stored twice, in {first} and {name}",
                    file=str(weights.root / name),
                    key=info.key,
                    hint="Remove the duplicate or fix the index"
                    if copy is None
                    else f"{copy} is a second copy of the weights (Mistral's own format), and the HF-named shards do "
                    f"not hold every one of its tensors, so neither can be chosen: restore {SAFETENSORS_INDEX}, or "
                    f"move {copy} out of the directory",
                )
            tensors[info.key] = info
    if weights.weight_map is not None:
        _check_weight_map(weights, tensors)
    return Checkpoint(weights.root, weights.format, config, tensors, file_sizes)


#: transformers' shard names, and Mistral's own copy of the weights that its repositories keep beside them
#: (``consolidated.safetensors``, or ``consolidated-00001-of-00002.safetensors`` and the like).
_HF_SHARD = re.compile(r"model-(\d{5})-of-(\d{5})\.safetensors")
_CONSOLIDATED = re.compile(r"consolidated([.-][\w.-]*)?\.safetensors")


def _without_covered_copies(root: Path, per_file: dict[str, list[TensorInfo]]) -> dict[str, list[TensorInfo]]:
    """A directory without an index that holds a complete set of HF-named shards and Mistral's consolidated
    copy beside them: the copy is left out when the shards hold every one of its tensors (under its names, or
    under Mistral's by dtype and shape), as vLLM reads only the shards. Otherwise every file stays, and a key in
    two files is refused as before."""
    shards = [name for name in per_file if _HF_SHARD.fullmatch(name)]
    copies = [name for name in per_file if _CONSOLIDATED.fullmatch(name)]
    numbers = {_HF_SHARD.fullmatch(name).groups() for name in shards}  # type: ignore[union-attr]
    totals = {total for _, total in numbers}
    if not copies or len(totals) != 1 or {int(i) for i, _ in numbers} != set(range(1, int(next(iter(totals))) + 1)):
        return per_file
    held = [info for name in shards for info in per_file[name]]
    copied = [info for name in copies for info in per_file[name]]
    how = _covered(held, copied)
    if how is None:
        return per_file
    logger.info(
        "%s: %s %s not read: the %d HF-named shards model-*-of-%s.safetensors hold every one of %s %d tensors (%s)",
        root,
        ", ".join(copies),
        "is" if len(copies) == 1 else "are",
        len(shards),
        next(iter(totals)),
        "its" if len(copies) == 1 else "their",
        len(copied),
        how,
    )
    return {name: infos for name, infos in per_file.items() if name not in copies}


def _covered(held: list[TensorInfo], copied: list[TensorInfo]) -> str | None:
    """How every tensor of ``copied`` is in ``held``: under its own name with its dtype and shape, or (for a copy
    under other names, as Mistral's are) as one more tensor of its dtype and shape; ``None`` if one is not."""
    by_key = {info.key: info for info in held}
    copied_keys = {info.key for info in copied}
    unnamed = collections.Counter((info.dtype, info.shape) for info in held if info.key not in copied_keys)
    renamed = False
    for info in copied:
        same = by_key.get(info.key)
        if same is not None:
            if (same.dtype, same.shape) != (info.dtype, info.shape):
                return None
            continue
        if unnamed[info.dtype, info.shape] == 0:
            return None
        unnamed[info.dtype, info.shape] -= 1
        renamed = True
    return "by dtype and shape, under other names" if renamed else "under its own names"


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
        check_regular(path, what="weight file")
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
    text = _header_text(raw, path)
    del raw  # one copy of the header at a time: its text, then what it parses to
    header = parse_json(text, path, what="header", hint="The file is corrupt or truncated: re-download it")
    del text
    if not isinstance(header, dict):
        raise _bad(path, "header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise _bad(path, "__metadata__ is not a map of strings to strings (safetensors refuses it too)")
    data_start = 8 + header_len
    data_size = size - data_start
    infos = [_parse_entry(path, name, key, entry, data_start, data_size) for key, entry in header.items()]
    del header
    infos.sort(key=_offsets)
    cursor = data_start
    for info in infos:
        if info.begin != cursor:
            what = "overlaps the previous tensor" if info.begin < cursor else "leaves a gap before it"
            raise _bad(path, f"byte range [{info.begin - data_start}, {info.end - data_start}) {what}", key=info.key)
        cursor = info.end
    if cursor != size:
        raise _bad(path, f"{size - cursor} bytes after the last tensor are not described by the header")
    return infos


def _offsets(info: TensorInfo) -> tuple[int, int]:
    return info.begin, info.end


def _header_text(raw: bytes, path: Path) -> str:
    """The header's text, after the bounds that keep its parse small: at most :data:`MAX_HEADER_VALUES` JSON
    values (counted from the bytes before anything is parsed), and at most :data:`MAX_HEADER_TEXT_BYTES` of
    text in memory (a header of characters beyond U+FFFF takes four bytes a character).

    Raises:
        CheckpointError: a bound is passed, or the header is not UTF-8.
    """
    values = count_json_values(raw)
    if values > MAX_HEADER_VALUES:
        raise _bad(
            path,
            f"header holds up to {values} JSON values, more than the {MAX_HEADER_VALUES} a header can "
            f"(about {MAX_HEADER_VALUES // _VALUES_PER_TENSOR} tensors a file)",
        )
    text = decode_json(raw, path, what="header", hint="The file is corrupt or truncated: re-download it")
    if sys.getsizeof(text) > MAX_HEADER_TEXT_BYTES:
        raise _bad(
            path,
            f"header of {len(raw)} bytes takes {sys.getsizeof(text)} bytes as text, more than the "
            f"{MAX_HEADER_TEXT_BYTES} a header can (it holds characters beyond U+FFFF)",
        )
    return text


def _parse_entry(path: Path, name: str, key: str, entry: object, data_start: int, data_size: int) -> TensorInfo:
    """One tensor's header entry, checked as safetensors checks it: a known dtype, a shape of whole numbers
    below 2^64 whose running product stays below 2^64, and a byte range of exactly the bytes the shape needs,
    inside the data. Plain type checks: this runs once for every tensor of every file."""
    if type(entry) is not dict:
        raise _bad(path, "header entry is not an object", key=key)
    name_of_dtype = entry.get("dtype")
    dtype = DTYPES.get(name_of_dtype) if type(name_of_dtype) is str else None
    if dtype is None:
        raise _bad(path, f"unknown dtype {short_repr(name_of_dtype)}; known: {', '.join(DTYPES)}", key=key)
    shape = entry.get("shape")
    if type(shape) is not list:
        raise _bad(path, f"shape {short_repr(shape)} is not a list of non-negative integers", key=key)
    numel = 1
    for dim in shape:
        if type(dim) is not int or dim < 0:
            raise _bad(path, f"shape {short_repr(shape)} is not a list of non-negative integers", key=key)
        if dim > MAX_DIM:
            raise _bad(path, f"shape {short_repr(shape)} has a dimension over 2^64 - 1", key=key)
        numel *= dim
        if numel > MAX_DIM:  # safetensors multiplies the dims in order, refusing a product that overflows
            raise _bad(path, f"shape {short_repr(shape)}: the product of its dimensions overflows 64 bits", key=key)
    offsets = entry.get("data_offsets")
    if not (type(offsets) is list and len(offsets) == 2 and type(offsets[0]) is int and type(offsets[1]) is int):
        raise _bad(path, f"data_offsets {short_repr(offsets)} is not a pair of integers", key=key)
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise _bad(
            path, f"data_offsets [{begin}, {end}) fall outside the {data_size} data bytes (truncated file?)", key=key
        )
    expected = numel * dtype.itemsize
    if end - begin != expected:
        raise _bad(
            path,
            f"shape {short_repr(shape)} of {name_of_dtype} needs {expected} bytes but data_offsets span {end - begin}",
            key=key,
        )
    return TensorInfo(key, name, dtype, tuple(shape), data_start + begin, data_start + end)


def read_pickle_header(root: Path, name: str) -> list[TensorInfo]:
    """Indexes a ``.bin`` file by memory-mapping it with ``weights_only=True`` (no code is ever executed).

    A tensor stored as one contiguous run of its zip record gets that run's absolute byte range, so
    that it is read like a safetensors tensor; any other keeps ``begin == end == -1``.

    Raises:
        CheckpointError: the file is missing, is not a torch checkpoint, or needs code execution to load.
    """
    state, records = _load_checked_pickle(root / name)
    # torch maps the whole file once and every storage is a run of that mapping: the first storage
    # in memory is the first record in the file, which gives the mapping's base address
    base = min((t.untyped_storage().data_ptr() for t in state.values() if t.numel()), default=0)
    base -= min(records.values(), default=(0, 0))[0]
    infos = []
    for key, tensor in state.items():
        storage = tensor.untyped_storage()
        record = storage.data_ptr() - base
        begin = end = -1
        if tensor.numel() and tensor.is_contiguous() and (record, storage.nbytes()) in records.values():
            begin = record + tensor.storage_offset() * tensor.element_size()
            end = begin + tensor.numel() * tensor.element_size()
        infos.append(TensorInfo(key, name, tensor.dtype, tuple(tensor.shape), begin, end))
    return infos


def load_pickle(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.bin`` file, mapped, after the checks of :func:`_load_checked_pickle`."""
    return _load_checked_pickle(path)[0]


def _load_checked_pickle(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, int]]]:
    """Memory-maps a ``.bin`` state dict with ``weights_only=True``, after checking that every storage
    record of the zip archive holds exactly the bytes its tensors need (``torch.load`` with ``mmap``
    does not: a record cut short would read the bytes after it).

    Raises:
        CheckpointError: as :func:`read_pickle_header`, a legacy (non-zip) file, a record that does
            not match its storage, or tensors that are sparse, quantized, on the meta device or of a
            dtype tp_loader cannot shard.
    """
    try:
        check_regular(path, what="weight file")
    except FileNotFoundError:
        raise CheckpointError(
            "weight file does not exist", file=str(path), hint="Re-download the checkpoint; the index names this file"
        ) from None
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            ".bin file is in torch's legacy (pre-1.6, non-zip) format, which cannot be memory-mapped or checked",
            file=str(path),
            hint="Re-save it with a current torch (torch.save) or convert the model to safetensors",
        )
    records = _check_records(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - torch.load runs what the file says: a failure there is the file's
        first = str(exc).splitlines()[0] if str(exc) else ""
        said = first if isinstance(exc, _NAMED_BY_TORCH) and first else f"{type(exc).__name__}: {first}".rstrip(": ")
        raise CheckpointError(
            f"refused or could not read the .bin file with weights_only=True: {short_text(said)}",
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
    for key, tensor in state.items():
        kind = (
            "sparse"
            if tensor.layout != torch.strided
            else "quantized"
            if tensor.is_quantized
            else "on the meta device"
            if tensor.is_meta
            else None
            if tensor.dtype in _NAMES
            else f"of dtype {tensor.dtype}"
        )
        if kind is not None:
            raise CheckpointError(
                f"tensor is {kind}, which tp_loader cannot shard",
                file=str(path),
                key=key,
                hint="Convert the model to safetensors with dense tensors",
            )
    return state, records


#: Exceptions of torch.load whose first line says enough without their type's name.
_NAMED_BY_TORCH = (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, AttributeError)


class _StorageSizes(pickle.Unpickler):
    """Reads a torch zip archive's ``data.pkl`` for its storage records only: every global becomes an
    inert stand-in, so nothing from the file is executed; each persistent id
    ``("storage", type, key, location, numel)`` is recorded."""

    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self.storages: dict[str, tuple[str, int]] = {}

    def find_class(self, module: str, name: str) -> object:
        return _Inert(name)

    def persistent_load(self, pid: object) -> object:
        if isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage":
            _, storage_type, key, _, numel = pid
            if not (isinstance(storage_type, _Inert) and type(key) is str and type(numel) is int and numel >= 0):
                shown = tuple(p.name if isinstance(p, _Inert) else p for p in pid)
                raise _MalformedRecord(f"has a malformed storage record in data.pkl: {short_repr(shown, 200)}")
            self.storages[key] = (storage_type.name, numel)
        return None


class _MalformedRecord(ValueError):
    """A storage record of ``data.pkl`` that is not ``("storage", type, key, location, numel)``."""


class _Inert:
    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, *args: object, **kwargs: object) -> _Inert:
        return self


def _check_records(path: Path) -> dict[str, tuple[int, int]]:
    """Every storage record is stored uncompressed, lies inside the file, and holds exactly the bytes
    of its storage (``numel`` elements of the storage type named in ``data.pkl``).

    Returns:
        Storage key → (absolute offset of the record's bytes, their length).
    """
    size = path.stat().st_size
    records: dict[str, tuple[int, int]] = {}
    try:
        with zipfile.ZipFile(path) as archive, open(path, "rb") as handle:
            names = archive.namelist()
            pickled = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
            if len(pickled) != 1:
                raise _bad_bin(path, f"has {len(pickled)} data.pkl records, not one")
            prefix = pickled[0].removesuffix("data.pkl")
            reader = _StorageSizes(archive.read(pickled[0]))
            reader.load()
            for key, (storage_type, numel) in reader.storages.items():
                info = archive.getinfo(f"{prefix}data/{key}")
                itemsize = _storage_itemsize(storage_type)
                handle.seek(info.header_offset + 26)
                name_len, extra_len = struct.unpack("<HH", handle.read(4))
                begin = info.header_offset + 30 + name_len + extra_len
                if info.compress_type != zipfile.ZIP_STORED or begin + info.file_size > size:
                    raise _bad_bin(path, f"storage record {key} is compressed or runs past the end of the file")
                if info.file_size != numel * itemsize:
                    raise _bad_bin(
                        path,
                        f"storage record {key} holds {info.file_size} bytes, but data.pkl needs {numel} x "
                        f"{itemsize} = {numel * itemsize}",
                    )
                records[key] = (begin, info.file_size)
    except CheckpointError:
        raise
    except _MalformedRecord as exc:
        raise _bad_bin(path, str(exc)) from None
    except RecursionError:
        raise _bad_bin(path, "has a data.pkl that nests too deeply") from None
    except (zipfile.BadZipFile, KeyError, pickle.UnpicklingError, EOFError, ValueError, struct.error) as exc:
        raise _bad_bin(path, f"is a damaged zip archive ({short_repr(str(exc))})") from None
    except Exception as exc:  # noqa: BLE001 - whatever else the archive or its pickle makes fail, the file is bad
        raise _bad_bin(path, f"is a damaged zip archive ({type(exc).__name__}: {short_repr(str(exc))})") from None
    return records


def _storage_itemsize(storage_type: str) -> int:
    """Bytes per element of a typed storage named in ``data.pkl`` (``FloatStorage``: 4)."""
    storage = getattr(torch, storage_type, None) if storage_type.endswith("Storage") else None
    if storage_type == "UntypedStorage":
        return 1
    with warnings.catch_warnings():  # typed storages are deprecated; their dtype is what data.pkl means
        warnings.simplefilter("ignore")
        dtype = getattr(storage, "dtype", None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown storage type {storage_type!r}")
    return dtype.itemsize


def _bad_bin(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f".bin file {what}", file=str(path), hint="The file is corrupt: re-download it")


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
