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
from dataclasses import dataclass
from pathlib import Path

from .errors import CheckpointError, ModelNotFoundError

logger = logging.getLogger("tp_loader")

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
CONFIG = "config.json"

_SAFETENSORS_PATTERNS = [CONFIG, "*.safetensors", "*.safetensors.index.json"]
_PICKLE_PATTERNS = [CONFIG, "*.bin", "*.bin.index.json"]
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
    """Whether ``source`` has the shape of a Hub repository id (``name`` or ``org/name``)."""
    return bool(_REPO_ID.match(source)) and not source.startswith((".", "/")) and ".." not in source


def resolve_source(
    source: str | os.PathLike[str],
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    fetch: bool = True,
) -> Path:
    """Returns the local directory that holds the checkpoint ``source``.

    Args:
        source: a local directory or a Hub repository id.
        revision: Hub branch, tag or commit.
        cache_dir: Hub cache directory (default: huggingface_hub's).
        fetch: whether this process may download; when ``False`` only the local cache is used.

    Returns:
        The directory with ``config.json`` and the weights.

    Raises:
        ModelNotFoundError: ``source`` is neither a directory nor a repository that can be had.
    """
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
        raise ModelNotFoundError(
            f"model directory {text!r} does not exist",
            file=text,
            hint="Check the path, or pass a Hub repository id such as 'org/name'",
        )
    return _snapshot(text, revision=revision, cache_dir=cache_dir, fetch=fetch)


def _snapshot(repo_id: str, *, revision: str | None, cache_dir: str | os.PathLike[str] | None, fetch: bool) -> Path:
    import huggingface_hub
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = not fetch or os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
    last: Exception | None = None
    for patterns in (_SAFETENSORS_PATTERNS, _PICKLE_PATTERNS):
        try:
            folder = Path(
                huggingface_hub.snapshot_download(
                    repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=patterns, local_files_only=offline
                )
            )
        except (
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
            HfHubHTTPError,
            OSError,
            ValueError,
        ) as exc:
            last = exc
            continue
        if any(folder.glob(patterns[1])):
            return folder
    where = "the local Hub cache" if offline else "the Hub"
    hint = (
        "Download it first (huggingface-cli download) or unset HF_HUB_OFFLINE"
        if offline
        else "Check the repository id, the revision and your token"
    )
    raise ModelNotFoundError(
        f"model {repo_id!r} (revision {revision or 'main'}) has no safetensors or .bin weights in {where}: {last}",
        file=repo_id,
        hint=hint,
    )


def find_weights(root: Path) -> WeightFiles:
    """Finds the weight files in a checkpoint directory.

    safetensors is preferred; ``.bin`` files are a fallback for which slice-only reads are impossible.

    Raises:
        CheckpointError: no weights, or an index file that cannot be parsed.
    """
    for fmt, index_name, single in (
        ("safetensors", SAFETENSORS_INDEX, SAFETENSORS_SINGLE),
        ("pickle", PICKLE_INDEX, PICKLE_SINGLE),
    ):
        if (root / index_name).is_file():
            weight_map = read_weight_map(root, index_name)
            return WeightFiles(root, fmt, tuple(dict.fromkeys(weight_map.values())), index_name, weight_map)
        if (root / single).is_file():
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
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"cannot parse index file: {exc}", file=str(path), hint="Re-download or regenerate the index"
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
    """Refuses a weight file name that is absolute, climbs out with ``..``, or is a symlink resolving
    outside :func:`trusted_base`.

    Raises:
        CheckpointError: naming the offending entry.
    """
    parts = Path(name).parts
    outside = os.path.isabs(name) or ".." in parts or not parts
    if not outside:
        base = trusted_base(root)
        target = (root / name).resolve()
        outside = base != target and base not in target.parents
    if outside:
        raise CheckpointError(
            f"weight file {name!r} lies outside the model directory",
            file=file,
            key=key,
            hint="Weight files must lie inside the model directory (no absolute paths, '..' or symlinks pointing out)",
        )


def read_config(root: Path) -> dict:
    """Reads ``config.json``.

    Raises:
        CheckpointError: the file is missing or is not a JSON object.
    """
    path = root / CONFIG
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(
            "config.json is missing",
            file=str(path),
            hint="A Hugging Face checkpoint needs its config.json beside the weights",
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"cannot parse config.json: {exc}", file=str(path), hint="Fix or re-download config.json"
        ) from None
    if not isinstance(config, dict):
        raise CheckpointError("config.json is not a JSON object", file=str(path), hint="Fix or re-download config.json")
    return config
