"""The format of pre-sharded directories: their file names, the manifest (``tp_loader-sharded.json``) parsed into
records with every field checked for type and range before anything trusts it, and the state of the source as
the manifest records it (each file's name, size, modification time and a fingerprint of a few fixed pages).

The restart is in :mod:`tp_loader.sharded`, the writer in :mod:`tp_loader.sharded_save`.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import stat
import uuid
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from .arguments import DTYPES as DTYPE_ARGUMENTS
from .errors import CheckpointError, ReadError, short_repr
from .index import DTYPES, TensorInfo
from .resolve import PICKLE_INDEX, SAFETENSORS_INDEX, check_regular, parse_json

MANIFEST = "tp_loader-sharded.json"
FORMAT = "tp_loader-sharded"
#: Bumped whenever the files or the manifest change meaning; a directory of another version is refused.
#: 2: a save id in every rank file and the manifest; a content fingerprint of each source file.
FORMAT_VERSION = 2
#: Rank files carry one crc32 per block of this many bytes (checked in parallel, one block per thread).
CHECKSUM_BLOCK_BYTES = 64 * 1024 * 1024
#: The largest manifest read: it holds the source's header index, about 140 bytes and 9 JSON values a tensor
#: (DeepSeek-V3's 91,991 tensors at TP 8: 12.7 MB and 0.84 million values, parsed in 0.4 s and checked in 0.2 s).
#: The two bounds keep the parse of a hostile manifest (millions of tiny values, each a Python object) under 600 MB.
MAX_MANIFEST_BYTES = 32 * 1024 * 1024
MAX_MANIFEST_VALUES = 4_000_000
#: A source file's fingerprint hashes this many pages of it (the first, the last and evenly between) and its size.
FINGERPRINT_PAGES = 8
FINGERPRINT_PAGE_BYTES = 4096
#: Hex digits of a save id (and of a source file's fingerprint).
ID_HEX = 32

#: torch dtype → its safetensors name (every dtype the index stage reads).
SAFETENSORS_NAMES = {dtype: name for name, dtype in DTYPES.items()}
#: torch dtype name (``bfloat16``) → torch dtype, for the dtypes a checkpoint can hold.
TORCH_DTYPES = {str(dtype).removeprefix("torch."): dtype for dtype in DTYPES.values()}
#: The dtype names a manifest records for ``load(dtype=...)`` (torch's names: ``bfloat16``).
LOAD_DTYPES = tuple(name for name, dtype in DTYPE_ARGUMENTS.items() if str(dtype) == f"torch.{name}")
RANK_FILE = re.compile(r"rank-(\d{5})-of-(\d{5})\.safetensors")
#: Every name save-sharded writes (final and temporary): a directory holding anything else is not overwritten.
OWN_FILE = re.compile(
    r"\.?(rank-\d{5}-of-\d{5}\.safetensors|tp_loader-sharded\.json|config\.json)(\.[0-9a-f]{32})?(\.tmp)?"
)
_HEX = re.compile(r"[0-9a-f]*")
_MAX_INT64 = 2**63 - 1


def rank_file(rank: int, world_size: int) -> str:
    """The name of rank ``rank``'s file in a directory written for ``world_size`` ranks."""
    return f"rank-{rank:05d}-of-{world_size:05d}.safetensors"


def temporary_name(name: str, unique: bool = False) -> str:
    """A rank file's temporary name; ``unique`` for files that several writers (one per node) may write at once."""
    return f".{name}.{uuid.uuid4().hex}.tmp" if unique else f".{name}.tmp"


# ---------------------------------------------------------------------------------------------------------------
# records


@dataclass(frozen=True)
class RankFile:
    """One rank's file as the manifest describes it: its size, the sha256 of its header (8-byte length and JSON),
    the crc32 of each ``block_bytes`` block, and the sha256 of the layout it was written for."""

    rank: int
    name: str
    size: int
    header_sha256: str
    layout_sha256: str
    crc32: tuple[int, ...]


@dataclass(frozen=True)
class SourceFile:
    """One file of the source (config.json, the index, a weight file) as save-sharded saw it."""

    name: str
    size: int
    mtime_ns: int
    fingerprint: str  # content_fingerprint()


@dataclass(frozen=True)
class Manifest:
    """A parsed ``tp_loader-sharded.json``. Fields past ``source_root`` are empty when the format version is not
    this tp_loader's (such a directory is refused, but can still be rebuilt from its source)."""

    root: Path
    digest: str
    format_version: int
    version: str
    source_root: str
    world_size: int = 0
    plan: str = ""
    dtype: str | None = None
    arguments: dict[str, Any] = field(default_factory=dict)
    block_bytes: int = CHECKSUM_BLOCK_BYTES
    files: tuple[RankFile, ...] = ()
    save_id: str = ""
    source_model: str = ""
    source_format: str = "safetensors"
    source_fingerprint: str = ""
    source_files: tuple[SourceFile, ...] = ()
    config: dict[str, Any] = field(default_factory=dict)
    tensors: tuple[TensorInfo, ...] = ()
    tie_equal: tuple[tuple[bool, ...], ...] = ()

    @property
    def path(self) -> Path:
        return self.root / MANIFEST


# ---------------------------------------------------------------------------------------------------------------
# reading the manifest


def find_manifest(model: str | os.PathLike[str] | None) -> Manifest | None:
    """The manifest when ``model`` is a pre-sharded directory, else ``None``.

    Raises:
        CheckpointError: the manifest is not a regular file, is too large, cannot be read or parsed, or has a
            field of the wrong type or range (naming the field, as ``files[1].size``); or the directory holds rank
            files but no manifest (save-sharded did not finish).
    """
    if model is None:
        return None
    root = Path(model).expanduser()
    path = root / MANIFEST
    if not os.path.lexists(path):
        try:
            incomplete = root.is_dir() and any(OWN_FILE.fullmatch(p.name) and "rank-" in p.name for p in root.iterdir())
        except OSError:  # not listable: the load's own stages say why
            incomplete = False
        if incomplete:
            raise CheckpointError(
                f"the directory holds rank files but no {MANIFEST}: save-sharded did not finish writing it",
                file=str(root),
                hint="Re-run save-sharded into it (python -m tp_loader save-sharded SOURCE DIR --tp N)",
            )
        return None
    raw = _read_manifest(path)
    data = parse_json(raw, path, what="the manifest", hint=_rewrite_hint(root, None))
    try:
        return parse_manifest(root, hashlib.sha256(raw).hexdigest(), data)
    except InvalidField as exc:
        source = data.get("source") if isinstance(data, dict) else None
        root_of_source = source.get("root") if isinstance(source, dict) else None
        raise CheckpointError(
            exc.message,
            file=str(path),
            key=exc.field or None,
            hint=_rewrite_hint(root, root_of_source if isinstance(root_of_source, str) else None),
        ) from None


def _rewrite_hint(root: Path, source: str | None) -> str:
    source = source or "SOURCE"
    return f"Re-run save-sharded into the directory (python -m tp_loader save-sharded {source} {root} --tp N)"


def _read_manifest(path: Path) -> bytes:
    hint = _rewrite_hint(path.parent, None)
    try:
        check_regular(path, what="manifest")  # a FIFO would block the open forever
        with open(path, "rb") as handle:
            raw = handle.read(MAX_MANIFEST_BYTES + 1)
        if len(raw) > MAX_MANIFEST_BYTES:
            raise CheckpointError(
                f"the manifest is {os.stat(path).st_size} bytes, more than the {MAX_MANIFEST_BYTES} a manifest can be"
            )
        # every value the parse makes but the first follows a comma, a colon or an opening bracket
        values = sum(raw.count(mark) for mark in (b",", b":", b"[", b"{")) + 1
        if values > MAX_MANIFEST_VALUES:
            raise CheckpointError(
                f"the manifest holds up to {values} JSON values, more than the {MAX_MANIFEST_VALUES} a manifest can"
            )
        return raw
    except CheckpointError as exc:
        raise CheckpointError(exc.message, file=str(path), hint=hint) from None
    except OSError as exc:
        raise CheckpointError(f"cannot read the manifest: {exc.strerror or exc}", file=str(path), hint=hint) from None


class InvalidField(ValueError):
    """A manifest field that is missing, or of the wrong type or range; ``field`` is its path (``files[1].size``)."""

    def __init__(self, field: str, what: str) -> None:
        self.field = field
        self.message = f"manifest field {field} {what}" if field else f"the manifest {what}"
        super().__init__(self.message)


@dataclass(frozen=True)
class _Field:
    """A value of the manifest's JSON and its path, read with checks that name the path when they fail."""

    value: Any
    name: str = ""

    def __getitem__(self, key: str) -> _Field:
        members = self.members()
        child = f"{self.name}.{key}" if self.name else key
        if key not in members:
            raise InvalidField(child, "is missing")
        return _Field(members[key], child)

    def get(self, key: str, default: Any) -> _Field:
        return self[key] if key in self.members() else _Field(default, f"{self.name}.{key}")

    def fail(self, what: str) -> InvalidField:
        return InvalidField(self.name, what)

    def members(self) -> dict[str, Any]:
        if not isinstance(self.value, dict):
            raise self.fail("is not a JSON object" if not self.name else f"is {short_repr(self.value)}, not an object")
        return self.value

    def values(self) -> list[Any]:
        if not isinstance(self.value, list):
            raise self.fail(f"is {short_repr(self.value)}, not a list")
        return self.value

    def items(self, length: int | None = None, what: str = "") -> list[_Field]:
        values = self.values()
        if length is not None and len(values) != length:
            raise self.fail(f"lists {len(values)} entries, not {length}{what}")
        return [_Field(value, f"{self.name}[{i}]") for i, value in enumerate(values)]

    def number(self, minimum: int = 0, maximum: int = _MAX_INT64) -> int:
        value = self.value
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(f"is {short_repr(value)}, not a whole number")
        if value < minimum:
            raise self.fail(f"is {value}, less than {minimum}")
        if value > maximum:
            raise self.fail(f"is {short_repr(value)}, more than {maximum}")
        return value

    def flag(self) -> bool:
        if not isinstance(self.value, bool):
            raise self.fail(f"is {short_repr(self.value)}, not true or false")
        return self.value

    def text(self, *, empty: bool = False) -> str:
        if not isinstance(self.value, str) or (not empty and not self.value):
            raise self.fail(f"is {short_repr(self.value)}, not a non-empty string")
        return self.value

    def optional_text(self) -> str | None:
        if self.value is not None and not (isinstance(self.value, str) and self.value):
            raise self.fail(f"is {short_repr(self.value)}, not null or a non-empty string")
        return self.value

    def hex(self, length: int) -> str:
        value = self.value
        if not (isinstance(value, str) and len(value) == length and _HEX.fullmatch(value)):
            raise self.fail(f"is {short_repr(value)}, not {length} lowercase hex digits")
        return value

    def relative_name(self) -> str:
        """A file name inside the source's directory (no absolute path, no ``..``)."""
        name = self.text()
        if not _inside(name):
            raise self.fail(f"is {short_repr(name)}, not a file name inside the source's directory")
        return name


def _inside(name: str) -> bool:
    return not (name.startswith("/") or ".." in PurePosixPath(name).parts or "\\" in name or "\0" in name)


def parse_manifest(root: Path, digest: str, data: object) -> Manifest:
    """The manifest at ``root`` from its parsed JSON ``data`` (``digest``: the sha256 of its bytes).

    Raises:
        InvalidField: naming the first field that is missing or of the wrong type or range.
    """
    top = _Field(data)
    top.members()
    if top["format"].value != FORMAT:
        raise top["format"].fail(f"is {short_repr(top['format'].value)}, not {FORMAT!r}")
    source = top["source"]
    head = Manifest(
        root,
        digest,
        top["format_version"].number(minimum=1),
        top["tp_loader_version"].text(),
        _absolute(source["root"]),
    )
    if head.format_version != FORMAT_VERSION:
        return head
    world_size = top["world_size"].number(minimum=1)
    block_bytes = _checksum(top["checksum"])
    dtype = _dtype(top["dtype"])
    arguments = _arguments(top["arguments"], dtype)
    return Manifest(
        root,
        digest,
        head.format_version,
        head.version,
        head.source_root,
        world_size=world_size,
        plan=top["plan"].text(),
        dtype=dtype,
        arguments=arguments,
        block_bytes=block_bytes,
        files=tuple(
            _rank_file(entry, rank, world_size, block_bytes)
            for rank, entry in enumerate(top["files"].items(world_size, " (one per rank)"))
        ),
        save_id=top["save_id"].hex(ID_HEX),
        source_model=source["model"].text(),
        source_format=_one_of(source["format"], ("safetensors", "pickle")),
        source_fingerprint=source["fingerprint"].hex(64),
        source_files=tuple(_source_file(entry) for entry in source["files"].items()),
        config=source["config"].members(),
        tensors=_tensors(source["tensors"]),
        tie_equal=_tie_equal(top["tie_equal"], world_size),
    )


def _tie_equal(entry: _Field, world_size: int) -> tuple[tuple[bool, ...], ...]:
    """Per rank of the saving job (every replica's ranks), for each tie stored on both sides, whether it was equal."""
    ranks = entry.items()
    if not ranks or len(ranks) % world_size:
        raise entry.fail(f"lists {len(ranks)} entries, not one per rank of the saving job ({world_size} or a multiple)")
    return tuple(tuple(flag.flag() for flag in per_rank.items()) for per_rank in ranks)


def _absolute(entry: _Field) -> str:
    path = entry.text()
    if not os.path.isabs(path):
        raise entry.fail(f"is {short_repr(path)}, not an absolute path")
    return path


def _one_of(entry: _Field, allowed: tuple[str, ...]) -> str:
    if entry.value not in allowed:
        raise entry.fail(f"is {short_repr(entry.value)}, not one of {', '.join(allowed)}")
    return entry.value


def _checksum(entry: _Field) -> int:
    _one_of(entry["algorithm"], ("crc32",))
    return entry["block_bytes"].number(minimum=1)


def _dtype(entry: _Field) -> str | None:
    """A dtype name as ``load(dtype=...)`` takes it, or ``None``."""
    name = entry.optional_text()
    if name is not None and name not in LOAD_DTYPES:
        raise entry.fail(f"is {short_repr(name)}, not null or one of {', '.join(LOAD_DTYPES)}")
    return name


def _arguments(entry: _Field, dtype: str | None) -> dict[str, Any]:
    """The load's arguments (:class:`tp_loader.arguments.Fingerprint`'s fields) as the directory was written with."""
    arguments = {
        "dtype": _dtype(entry["dtype"]),
        "plan": entry["plan"].text(),
        "mode": entry["mode"].optional_text(),
        "strict": entry["strict"].flag(),
        "allow_unmatched": entry["allow_unmatched"].flag(),
        "zero_copy": entry["zero_copy"].flag(),
        "device_type": entry["device_type"].text(),
        "share": entry.get("share", "none").text(),
    }
    if arguments["dtype"] != dtype:
        raise entry["dtype"].fail(f"is {arguments['dtype']!r}, and the manifest's dtype is {dtype!r}")
    return arguments


def _rank_file(entry: _Field, rank: int, world_size: int, block_bytes: int) -> RankFile:
    if entry["rank"].number() != rank:
        raise entry["rank"].fail(f"is {entry['rank'].value}, not {rank} (the files are listed in rank order)")
    name = entry["name"].text()
    if name != rank_file(rank, world_size):
        raise entry["name"].fail(f"is {short_repr(name)}, not {rank_file(rank, world_size)!r}")
    size = entry["size"].number(minimum=8)
    crc32 = entry["crc32"].items(math.ceil(size / block_bytes), f" (one per {block_bytes}-byte block of the file)")
    return RankFile(
        rank,
        name,
        size,
        entry["header_sha256"].hex(64),
        entry["layout_sha256"].hex(64),
        tuple(value.number(maximum=2**32 - 1) for value in crc32),
    )


def _source_file(entry: _Field) -> SourceFile:
    name, size, mtime_ns, fingerprint = entry.items(4, " (name, size, modification time, fingerprint)")
    return SourceFile(
        name.relative_name(), size.number(), mtime_ns.number(minimum=-_MAX_INT64 - 1), fingerprint.hex(ID_HEX)
    )


def _tensors(entry: _Field) -> tuple[TensorInfo, ...]:
    """The source's header index. A row that passes the plain checks of :func:`_checked_row` is taken as it is
    (DeepSeek-V3's 91,991 rows in 0.2 s); any other is read again field by field, which names what is wrong."""
    tensors: dict[str, TensorInfo] = {}
    names: set[str] = set()  # file names already checked
    for index, row in enumerate(entry.values()):
        info = _checked_row(row, tensors, names)
        if info is None:
            info = _tensor(_Field(row, f"{entry.name}[{index}]"), tensors)
        tensors[info.key] = info
    return tuple(tensors.values())


def _checked_row(row: Any, seen: dict[str, TensorInfo], names: set[str]) -> TensorInfo | None:
    """The row as a tensor when every check of :func:`_tensor` passes, else ``None``."""
    if type(row) is not list or len(row) != 6:
        return None
    key, file, dtype, shape, begin, end = row
    if type(key) is not str or not key or key in seen or type(dtype) is not str or dtype not in TORCH_DTYPES:
        return None
    if type(shape) is not list or not all(type(dim) is int and 0 <= dim <= _MAX_INT64 for dim in shape):
        return None
    if type(begin) is not int or type(end) is not int or not -1 <= begin <= end <= _MAX_INT64:
        return None
    if type(file) is not str or (file not in names and not (file and _inside(file))):
        return None
    names.add(file)
    return TensorInfo(key, file, TORCH_DTYPES[dtype], tuple(shape), begin, end)


def _tensor(item: _Field, seen: dict[str, TensorInfo]) -> TensorInfo:
    key, file, dtype, shape, begin, end = item.items(6, " (key, file, dtype, shape, begin, end)")
    if key.text() in seen:
        raise key.fail(f"lists {short_repr(key.value)} a second time")
    name = dtype.text()
    if name not in TORCH_DTYPES:
        raise dtype.fail(f"is {short_repr(name)}, not one of {', '.join(TORCH_DTYPES)}")
    first = begin.number(minimum=-1)  # -1: a .bin tensor that is not one run of its file
    if end.number(minimum=-1) < first:
        raise end.fail("ends before the tensor begins")
    dims = tuple(dim.number() for dim in shape.items())
    return TensorInfo(key.value, file.relative_name(), TORCH_DTYPES[name], dims, first, end.value)


# ---------------------------------------------------------------------------------------------------------------
# the source's state


def read_exact(fd: int, length: int, offset: int, path: Path) -> bytes:
    """``length`` bytes at ``offset``.

    Raises:
        ReadError: the file ends first.
    """
    out = b""
    while len(out) < length:
        got = os.pread(fd, length - len(out), offset + len(out))
        if not got:
            raise ReadError(f"file ends {offset + len(out)} bytes in", file=str(path), hint="Re-run save-sharded")
        out += got
    return out


def fingerprint_pages(size: int) -> list[tuple[int, int]]:
    """``(offset, length)`` of the pages :func:`content_fingerprint` hashes in a file of ``size`` bytes: the first
    page, the last and ``FINGERPRINT_PAGES - 2`` evenly between (page-aligned), or the whole of a small file."""
    page, count = FINGERPRINT_PAGE_BYTES, FINGERPRINT_PAGES
    if size <= count * page:
        return [(0, size)]
    last = size - page
    between = [i * last // (count - 1) // page * page for i in range(1, count - 1)]
    return [(0, page), *((offset, page) for offset in between), (last, page)]


def content_fingerprint(path: Path, size: int) -> str:
    """A cheap fingerprint of a file's content: blake2b (16 bytes) of its size and of the pages
    :func:`fingerprint_pages` names (32 KiB read whatever the size). A change inside none of those pages (with the
    size kept) is not seen.

    Raises:
        OSError: the file cannot be read (ReadError: it is shorter than ``size``).
    """
    digest = hashlib.blake2b(f"{size}\n".encode(), digest_size=ID_HEX // 2)
    fd = os.open(path, os.O_RDONLY)
    try:
        for offset, length in fingerprint_pages(size):
            digest.update(read_exact(fd, length, offset, path))
    finally:
        os.close(fd)
    return digest.hexdigest()


def source_files(root: Path, weight_files: list[str]) -> list[list[Any]]:
    """``[name, size, mtime_ns, fingerprint]`` of config.json, the index (if any) and every weight file.

    Raises:
        OSError: a file cannot be read or is not a regular file.
    """
    names = ["config.json"] + [n for n in (SAFETENSORS_INDEX, PICKLE_INDEX) if (root / n).is_file()] + weight_files
    found = []
    for name in names:
        st = (root / name).stat()
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"{name} is not a regular file")
        found.append([name, st.st_size, st.st_mtime_ns, content_fingerprint(root / name, st.st_size)])
    return found
