"""Stage 1, resolve: where are the checkpoint's files?

A model source is a local directory or a Hugging Face Hub repository id. Hub repositories are fetched
through ``huggingface_hub.snapshot_download`` (config and weights only); the caller decides which
processes may download (``fetch=True``) and which only look in the local cache.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import socket
import stat
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from .errors import CheckpointError, ModelNotFoundError, TPLoaderError, short_text

T = TypeVar("T")

logger = logging.getLogger("tp_loader")

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
CONFIG = "config.json"

_SAFETENSORS_PATTERNS = [CONFIG, "*.safetensors", "*.safetensors.index.json"]
_PICKLE_PATTERNS = [CONFIG, "*.bin", "*.bin.index.json"]
_NOT_REGULAR = "is not a regular file (a directory, FIFO, socket or device), so it is not read"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


@dataclass(frozen=True)
class WeightFiles:
    """The weight files of a checkpoint directory.

    Attributes:
        root: the checkpoint directory.
        format: ``"safetensors"`` or ``"pickle"`` (the ``.bin`` fallback).
        files: weight file names relative to ``root``, in the order they are listed.
        index: the index file name when the checkpoint is sharded, else ``None``.
        weight_map: the index's key → file name map when sharded, else ``None``.
    """

    root: Path
    format: str
    files: tuple[str, ...]
    index: str | None = None
    weight_map: dict[str, str] | None = None


def looks_like_repo_id(source: str) -> bool:
    """Whether ``source`` is taken for a Hub repository id rather than a local path.

    A Hub id has the shape ``org/name`` (or ``name`` for the Hub's oldest models). A string that starts
    with ``.``, ``/`` or ``~``, or whose parent directory exists here (``models/typo`` where ``models/``
    exists), is a path, so a mistyped path is reported as a missing directory instead of being looked
    up on the Hub.

    Args:
        source: the model source as the user gave it.

    Returns:
        ``True`` when ``source`` should be fetched from the Hub.
    """
    return _shaped_like_repo_id(source) and ("/" not in source or not Path(source).parent.is_dir())


def _shaped_like_repo_id(source: str) -> bool:
    """Whether ``source`` reads ``org/name`` (or a bare ``name``, as ``gpt2``) and does not start like a path."""
    return bool(_REPO_ID.match(source)) and ".." not in source and not source.startswith(".")


def resolve_source(
    source: str | os.PathLike[str],
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    fetch: bool = True,
    deadline_s: float | None = None,
) -> Path:
    """Returns the local directory that holds the checkpoint ``source``.

    Args:
        source: a local directory or a Hub repository id (see :func:`looks_like_repo_id`).
        revision: Hub branch, tag or commit.
        cache_dir: Hub cache directory (default: huggingface_hub's).
        fetch: whether this process may download; when ``False`` only the local cache is used.
        deadline_s: the Hub's answer (or download) must come within this many seconds; huggingface_hub
            itself waits without a bound on some calls.

    Returns:
        The directory with ``config.json`` and the weights.

    Raises:
        ModelNotFoundError: ``source`` is neither a directory nor a repository that can be had: the path does
            not exist, the repository is not in the cache while offline, the Hub cannot be reached, or the
            repository or revision does not exist there (each with its own message and the command to run).
        CheckpointError: the Hub cache cannot be written (permissions, disk space).
    """
    if deadline_s is not None:
        return call_within(
            deadline_s,
            lambda: resolve_source(source, revision=revision, cache_dir=cache_dir, fetch=fetch),
            lambda: ModelNotFoundError(
                f"fetching {os.fspath(source)!r} did not finish within {deadline_s:g} s (half of TP_LOADER_TIMEOUT_S, "
                "so that every rank hears of it within the timeout)",
                file=os.fspath(source),
                hint="The Hub or the network is not answering: try again, download first with `hf download`, or "
                "raise TP_LOADER_TIMEOUT_S for a large download",
            ),
        )
    path = Path(source).expanduser()
    if path.is_dir():
        return path.resolve()
    text = os.fspath(source)
    if path.exists():
        raise ModelNotFoundError(
            f"model source {text!r} is a file, not a checkpoint directory",
            file=text,
            hint="Pass the directory that holds config.json and the weights",
        )
    if not looks_like_repo_id(text):
        parent = os.fspath(Path(text).parent)
        raise ModelNotFoundError(
            f"model directory {text!r} does not exist",
            file=text,
            hint=(
                f"Check the path; it is not looked up on the Hub because the directory {parent!r} exists here"
                if _shaped_like_repo_id(text)
                else "Check the path, or pass a Hub repository id such as 'org/name'"
            ),
        )
    return _snapshot(text, revision=revision, cache_dir=cache_dir, fetch=fetch)


def call_within(seconds: float, fn: Callable[[], T], timed_out: Callable[[], TPLoaderError]) -> T:
    """``fn()`` run in a daemon thread and waited for at most ``seconds``: a call that blocks past that
    (a Hub that accepts a connection and never answers, a hung network filesystem) is left behind, and
    ``timed_out()`` is raised instead. Exceptions from ``fn`` are re-raised here."""
    outcome: list[tuple[bool, Any]] = []
    worker = threading.Thread(target=lambda: outcome.append(_outcome(fn)), name="tp_loader_bounded", daemon=True)
    worker.start()
    worker.join(seconds)
    if not outcome:
        raise timed_out()
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


def _outcome(fn: Callable[[], Any]) -> tuple[bool, Any]:
    try:
        return True, fn()
    except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread
        return False, exc


@dataclass(frozen=True)
class _HubRequest:
    """One Hub repository at one revision in one cache, as the error messages name it."""

    repo_id: str
    revision: str | None
    cache_dir: str | os.PathLike[str] | None

    @property
    def model(self) -> str:
        return f"model {self.repo_id!r} (revision {self.revision or 'main'})"

    @property
    def cache(self) -> str:
        from huggingface_hub import constants

        return os.fspath(Path(self.cache_dir).expanduser()) if self.cache_dir is not None else constants.HF_HUB_CACHE

    @property
    def endpoint(self) -> str:
        from huggingface_hub import constants

        return constants.ENDPOINT

    @property
    def command(self) -> str:
        """The ``hf`` command that downloads this repository into this cache."""
        words = ["hf", "download", self.repo_id]
        if self.revision is not None:
            words += ["--revision", self.revision]
        if self.cache_dir is not None:
            words += ["--cache-dir", self.cache]
        return shlex.join(words)


def _offline_by_env() -> bool:
    """Whether HF_HUB_OFFLINE is set now, or was when huggingface_hub was imported."""
    from huggingface_hub import constants

    now = os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on")
    return now or bool(constants.HF_HUB_OFFLINE)


def _snapshot(repo_id: str, *, revision: str | None, cache_dir: str | os.PathLike[str] | None, fetch: bool) -> Path:
    """Fetches (or, offline, finds in the cache) config.json and the weights of a Hub repository: safetensors
    first, else ``.bin``.

    Raises:
        ModelNotFoundError: see :func:`_hub_error` for the cases; or the repository has no weights.
        CheckpointError: the cache could not be written.
    """
    import huggingface_hub
    from huggingface_hub import errors as hub_errors

    incomplete_type = getattr(hub_errors, "IncompleteSnapshotError", ())  # huggingface_hub >= 2
    request = _HubRequest(repo_id, revision, cache_dir)
    env_offline = _offline_by_env()
    offline = not fetch or env_offline
    incomplete: Exception | None = None
    for patterns in (_SAFETENSORS_PATTERNS, _PICKLE_PATTERNS):
        try:
            folder = Path(
                huggingface_hub.snapshot_download(
                    repo_id,
                    revision=revision,
                    cache_dir=cache_dir,
                    allow_patterns=patterns,
                    local_files_only=offline,
                )
            )
        except incomplete_type as exc:  # cached without some of these files: the .bin patterns may still be whole
            incomplete = exc
            continue
        except Exception as exc:
            error = _hub_error(request, exc, offline=offline, env_offline=env_offline)
            if error is None:
                raise
            raise error from exc
        if any(folder.glob(patterns[1])):
            return folder
    if incomplete is not None:
        error = _hub_error(request, incomplete, offline=offline, env_offline=env_offline, partly=True)
        raise (error or incomplete) from incomplete
    if offline:
        raise ModelNotFoundError(
            f"{request.model} in the local Hub cache {request.cache} has no safetensors or .bin weights",
            file=repo_id,
            hint=f"Download the weights with `{request.command}`",
        )
    raise ModelNotFoundError(
        f"{request.model} on the Hub at {request.endpoint} has no safetensors or .bin weights",
        file=repo_id,
        hint="Check the repository id and revision: tp_loader needs *.safetensors (or *.bin) files beside config.json",
    )


def _hub_error(
    request: _HubRequest, exc: BaseException, *, offline: bool, env_offline: bool, partly: bool = False
) -> CheckpointError | None:
    """The error to raise for a failed ``snapshot_download``, judged by the whole exception chain (the Hub
    client wraps the cause, e.g. a refused connection inside ``LocalEntryNotFoundError``).

    Args:
        request: the repository, revision and cache.
        exc: what ``snapshot_download`` raised.
        offline: downloads were off (``fetch=False`` or HF_HUB_OFFLINE).
        env_offline: downloads were off because of HF_HUB_OFFLINE.
        partly: the cache holds the revision but not all of its weight files.

    Returns:
        A :class:`ModelNotFoundError` (or a :class:`CheckpointError` for a local I/O failure), or ``None`` for an
        exception that is not about reaching the repository (a bug to re-raise as it is).
    """
    from huggingface_hub import errors as hub_errors

    chain = _exception_chain(exc)

    def first(types: type[BaseException] | tuple[type[BaseException], ...]) -> BaseException | None:
        return next((e for e in chain if isinstance(e, types)), None)

    model, cache, endpoint, command, repo_id = (
        request.model,
        request.cache,
        request.endpoint,
        request.command,
        request.repo_id,
    )
    in_cache = f"is only partly in the local Hub cache {cache}" if partly else f"is not in the local Hub cache {cache}"
    if first(hub_errors.GatedRepoError):
        return ModelNotFoundError(
            f"{model} is a gated repository on the Hub at {endpoint}, and no token with access to it was sent",
            file=repo_id,
            hint=f"Request access at {endpoint}/{repo_id}, log in as a user who has it (`hf auth login`, "
            f"or set HF_TOKEN), then run `{command}`",
        )
    if first(hub_errors.RepositoryNotFoundError):
        return ModelNotFoundError(
            f"{model} was not found on the Hub at {endpoint}: no such repository, or it is private and no valid "
            "token was sent",
            file=repo_id,
            hint=f"Check the repository id; for a private repository log in (`hf auth login`, or set HF_TOKEN), "
            f"then run `{command}`",
        )
    if first(hub_errors.RevisionNotFoundError):
        return ModelNotFoundError(
            f"revision {request.revision or 'main'!r} of model {repo_id!r} was not found on the Hub at {endpoint} "
            "(the repository exists)",
            file=repo_id,
            hint=f"Check the branch, tag or commit name, then run `{command}`",
        )
    if first(hub_errors.OfflineModeIsEnabled) or (offline and first(hub_errors.LocalEntryNotFoundError)):
        reason = "HF_HUB_OFFLINE is set" if env_offline else "fetch=False: this process only reads the cache"
        return ModelNotFoundError(
            f"{model} {in_cache}, and downloads are off ({reason})",
            file=repo_id,
            hint=f"Run `{command}` where the Hub is reachable"
            + (", or unset HF_HUB_OFFLINE to let tp_loader download it" if env_offline else ""),
        )
    cause = first(_network_error_types())
    if cause is not None:
        return ModelNotFoundError(
            f"cannot reach the Hub at {endpoint} for {model} ({type(cause).__name__}: {cause}), and it {in_cache}",
            file=repo_id,
            hint=f"Check the network, proxy and HF_ENDPOINT settings, then retry; or run `{command}` where the Hub "
            "is reachable",
        )
    cause = first(hub_errors.HfHubHTTPError)
    if cause is not None:
        status = getattr(getattr(cause, "response", None), "status_code", None)
        return ModelNotFoundError(
            f"the Hub at {endpoint} could not serve {model} (HTTP {status}), and it {in_cache}",
            file=repo_id,
            hint=f"Check your token (`hf auth whoami`) and retry later; or run `{command}` where the Hub serves it",
        )
    if first(hub_errors.HFValidationError):
        return ModelNotFoundError(
            f"{repo_id!r} is not a valid Hub repository id: {exc}",
            file=repo_id,
            hint="Pass a local checkpoint directory, or a Hub repository id such as 'org/name'",
        )
    if isinstance(exc, OSError):
        return CheckpointError(
            f"fetching {model} from the Hub at {endpoint} into the cache {cache} failed: {type(exc).__name__}: {exc}",
            file=repo_id,
            hint="Check that the cache directory is writable and has free space, then retry",
        )
    return None


def _exception_chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and its causes (explicit, else implicit), outermost first."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not seen for seen in chain):
        chain.append(current)
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return chain


def _network_error_types() -> tuple[type[BaseException], ...]:
    """Exception types that mean the Hub could not be reached: the socket's own, and the transport errors of
    whichever HTTP client huggingface_hub has imported (httpx2 in huggingface_hub 2, httpx in 1, requests
    before)."""
    types: list[type[BaseException]] = [ConnectionError, TimeoutError, socket.gaierror]
    for module, names in (
        ("httpx2", ("TransportError",)),
        ("httpx", ("TransportError",)),
        ("requests", ("ConnectionError", "Timeout")),
    ):
        loaded = sys.modules.get(module)
        types += [getattr(loaded, name) for name in names if isinstance(getattr(loaded, name, None), type)]
    return tuple(types)


def find_weights(root: Path) -> WeightFiles:
    """Finds the weight files in a checkpoint directory.

    safetensors is preferred; ``.bin`` files are a fallback for which slice-only reads are impossible.

    Raises:
        CheckpointError: no weights, or an index file that cannot be parsed.
    """
    if not os.access(root, os.R_OK | os.X_OK):
        raise CheckpointError(
            "the model directory cannot be listed or entered (no read or execute permission)",
            file=str(root),
            hint="Grant read and execute permission on the directory (chmod u+rx)",
        )
    for fmt, index_name, single in (
        ("safetensors", SAFETENSORS_INDEX, SAFETENSORS_SINGLE),
        ("pickle", PICKLE_INDEX, PICKLE_SINGLE),
    ):
        if (root / index_name).exists():  # not is_file(): a FIFO or directory here is an error, not absent
            weight_map = read_weight_map(root, index_name)
            return WeightFiles(root, fmt, tuple(dict.fromkeys(weight_map.values())), index_name, weight_map)
        if (root / single).exists():
            check_inside(root, single, file=str(root / single))
            return WeightFiles(root, fmt, (single,))
        others = sorted(p.name for p in root.glob("*.safetensors")) if fmt == "safetensors" else []
        if others:
            for name in others:
                check_inside(root, name, file=str(root / name))
            return WeightFiles(root, fmt, tuple(others))
    raise CheckpointError(
        f"no weights in {root}",
        file=str(root),
        hint=f"Expected {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX}, or a {PICKLE_SINGLE} fallback",
    )


def read_weight_map(root: Path, index_name: str) -> dict[str, str]:
    """Parses an index file's ``weight_map`` (checkpoint key → file name).

    Raises:
        CheckpointError: the index is not valid JSON, has no ``weight_map``, or names a path outside ``root``.
    """
    path = root / index_name
    try:
        data = read_json_file(path, what="index file", hint="Re-download or regenerate the index")
    except FileNotFoundError:
        raise CheckpointError(
            "index file does not exist", file=str(path), hint="Re-download or regenerate the index"
        ) from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointError(
            "index file has no 'weight_map' of key → file name",
            file=str(path),
            hint="Re-download or regenerate the index",
        )
    first_key = {
        name: key for key, name in reversed(weight_map.items())
    }  # each file checked once, named by its first key
    for name, key in first_key.items():
        check_inside(root, name, file=str(path), key=key)
    return weight_map


def trusted_base(root: Path) -> Path:
    """Where files of ``root`` may really live: ``root`` itself, or for a Hub cache snapshot
    (``models--org--name/snapshots/<sha>``, whose files link to ``../../blobs``) the repository's cache folder."""
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith(("models--", "datasets--", "spaces--")):
        return root.parent.parent.resolve()
    return root.resolve()


def check_inside(root: Path, name: str, *, file: str, key: str | None = None) -> None:
    """Refuses a weight file name that is absolute, climbs out with ``..`` (``sub/../x`` stays inside
    and is accepted), or is a symlink resolving outside :func:`trusted_base`.

    Raises:
        CheckpointError: naming the offending entry (a symlink loop too).
    """
    normal = os.path.normpath(name) if name else ""
    outside = not name or os.path.isabs(name) or normal == ".." or normal.startswith(".." + os.sep)
    if not outside:
        base = trusted_base(root)
        try:
            target = (root / name).resolve()
        except (RuntimeError, OSError) as exc:  # a symlink loop (RuntimeError before Python 3.13)
            raise CheckpointError(
                f"cannot resolve weight file {name!r}: {exc}",
                file=file,
                key=key,
                hint="Fix the symlinks in the model directory",
            ) from None
        outside = base != target and base not in target.parents
    if outside:
        raise CheckpointError(
            f"weight file {name!r} lies outside the model directory",
            file=file,
            key=key,
            hint="Weight files must lie inside the model directory (no absolute paths, '..' or symlinks pointing out)",
        )


def check_regular(path: Path, *, what: str) -> None:
    """Refuses anything but a regular file before it is opened: opening a FIFO blocks until a writer
    comes, which no timeout covers.

    Raises:
        FileNotFoundError: ``path`` does not exist (callers say what is missing).
        CheckpointError: ``path`` is a FIFO, socket, device or directory, a symlink loop, or unreadable.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise CheckpointError(f"cannot open the {what}: {exc}", file=str(path), hint="Fix the path") from None
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"the {what} {_NOT_REGULAR}", file=str(path), hint="Replace it with the real file")


def read_regular_file(
    path: Path,
    *,
    what: str,
    limit: int,
    limit_text: str,
    hint: str,
    error: type[TPLoaderError] = CheckpointError,
) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes. The file is opened without blocking and checked
    on the open descriptor, so a FIFO or a device put in its place after a check is refused all the same; at most
    ``limit + 1`` bytes are read, so a file that grows (or a device that never ends) costs no more.

    Args:
        what: the file's kind as messages name it (``"plan file"``).
        limit: the most bytes the file may have.
        limit_text: ``limit`` in words for the message (``"1 MiB"``).
        hint: what to do, for every refusal but a missing file.
        error: the :class:`TPLoaderError` subclass to raise.

    Raises:
        FileNotFoundError: ``path`` does not exist (callers say what is missing).
        TPLoaderError: of type ``error``: not a regular file (a FIFO, socket, device or directory), larger than
            ``limit``, or unreadable.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as exc:  # a symlink loop, no permission
        raise error(f"cannot open the {what}: {exc}", file=str(path), hint=hint) from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        size = info.st_size
        if not stat.S_ISREG(info.st_mode):
            raise error(f"the {what} {_NOT_REGULAR}", file=str(path), hint=hint)
        if size > limit:
            raise error(
                f"the {what} is {size} bytes, more than the {limit} allowed ({limit_text})",
                file=str(path),
                hint=hint,
            )
        try:
            raw = handle.read(limit + 1)
        except OSError as exc:
            raise error(f"cannot read the {what}: {exc}", file=str(path), hint=hint) from None
    if len(raw) > limit:  # it grew after the fstat
        raise error(f"the {what} is more than the {limit} bytes allowed ({limit_text})", file=str(path), hint=hint)
    return raw


def parse_json(raw: bytes | str, path: Path, *, what: str, hint: str) -> object:
    """Parses JSON exactly as safetensors and transformers accept it: UTF-8 without a byte-order mark.

    Args:
        raw: the file's bytes, or its text as :func:`decode_json` gave it (a caller that drops the bytes before
            parsing holds one copy of a large file less).

    Raises:
        CheckpointError: any other encoding, invalid JSON, nesting too deep, or integers too long to
            convert, naming the file.
    """
    text = decode_json(raw, path, what=what, hint=hint) if isinstance(raw, bytes) else raw
    try:
        return json.loads(text)
    except RecursionError:
        problem = f"{what} nests too deeply"
    except ValueError as exc:  # invalid JSON, a byte-order mark, an integer beyond the digit limit
        problem = f"{what} is not valid JSON ({short_text(str(exc))})"
    raise CheckpointError(f"cannot parse {what}: {problem}", file=str(path), hint=hint)


def decode_json(raw: bytes, path: Path, *, what: str, hint: str) -> str:
    """The text of a JSON file's bytes, which must be UTF-8 (see :func:`parse_json`).

    Raises:
        CheckpointError: the bytes are not UTF-8, naming the file.
    """
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        problem = f"{what} is not UTF-8 ({exc.reason} at byte {exc.start})"
    raise CheckpointError(f"cannot parse {what}: {problem}", file=str(path), hint=hint)


#: The most bytes, and JSON values (counted before parsing: commas, colons, opening brackets), of a config.json
#: or an index file. DeepSeek-V3's index (91,991 keys) is 8.9 MB and 184,000 values; a config.json is kilobytes.
#: Within both bounds a parse peaks under 700 MiB of RSS (a million short strings, the costliest values).
MAX_JSON_BYTES = 64 * 1024 * 1024
MAX_JSON_VALUES = 4_000_000
_VALUE_MARKS = (b",", b":", b"[", b"{")


def count_json_values(raw: bytes) -> int:
    """An upper bound on the JSON values in ``raw``, counted without parsing it (commas, colons and opening
    brackets in strings count too)."""
    return sum(raw.count(mark) for mark in _VALUE_MARKS) + 1


def read_json_file(path: Path, *, what: str, hint: str) -> object:
    """A regular file's JSON (see :func:`check_regular`, :func:`parse_json`), of at most :data:`MAX_JSON_BYTES`
    and :data:`MAX_JSON_VALUES`.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: as :func:`check_regular` and :func:`parse_json`, a bound passed, or a read error.
    """
    check_regular(path, what=what)
    raw = read_regular_file(path, what=what, limit=MAX_JSON_BYTES, limit_text="64 MiB", hint=hint)
    values = count_json_values(raw)
    if values > MAX_JSON_VALUES:
        raise CheckpointError(
            f"the {what} holds up to {values} JSON values, more than the {MAX_JSON_VALUES} allowed",
            file=str(path),
            hint=hint,
        )
    return parse_json(raw, path, what=what, hint=hint)


def read_config(root: Path) -> dict:
    """Reads ``config.json``.

    Raises:
        CheckpointError: the file is missing, not a regular file, or not a JSON object.
    """
    path = root / CONFIG
    try:
        config = read_json_file(path, what="config.json", hint="Fix or re-download config.json")
    except FileNotFoundError:
        raise CheckpointError(
            "config.json is missing",
            file=str(path),
            hint="A Hugging Face checkpoint needs its config.json beside the weights",
        ) from None
    if not isinstance(config, dict):
        raise CheckpointError("config.json is not a JSON object", file=str(path), hint="Fix or re-download config.json")
    return config
