"""The exception hierarchy of tp_loader.

Every error names what it can of the file, the key and the rank it concerns, and says what to do.
Errors cross process boundaries (one rank's failure is raised on every rank), so each one can be
rebuilt from :meth:`TPLoaderError.to_wire` on another rank.
"""

from __future__ import annotations

from typing import Any

#: Longest message an error keeps (every rank gathers it; config values can be huge).
MAX_MESSAGE = 1500


class TPLoaderError(Exception):
    """Base class of every error tp_loader raises.

    Args:
        message: what went wrong.
        file: the checkpoint file concerned, if any.
        key: the checkpoint key concerned, if any.
        rank: the rank on which the error was detected, if known.
        hint: what the user should do about it.
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        key: str | None = None,
        rank: int | None = None,
        hint: str | None = None,
    ) -> None:
        self.message = short_text(message, MAX_MESSAGE)
        self.file = file
        self.key = key
        self.rank = rank
        self.hint = hint
        super().__init__(self.__str__())

    def __str__(self) -> str:
        where = [
            f"{name}={value}"
            for name, value in (("rank", self.rank), ("file", self.file), ("key", self.key))
            if value is not None
        ]
        text = self.message
        if where:
            text += f" [{', '.join(where)}]"
        if self.hint:
            text += f". {self.hint}"
        return text

    def with_rank(self, rank: int) -> TPLoaderError:
        """Returns this error with ``rank`` filled in when it was not known yet."""
        if self.rank is None:
            self.rank = rank
            self.args = (self.__str__(),)
        return self

    def to_wire(self) -> dict[str, Any]:
        """A picklable description from which :func:`from_wire` rebuilds the same error."""
        return {
            "type": type(self).__name__,
            "message": self.message,
            "file": self.file,
            "key": self.key,
            "rank": self.rank,
            "hint": self.hint,
        }


class ArgumentError(TPLoaderError, ValueError):
    """An argument or environment setting is invalid (caught before any process group or I/O)."""


class CheckpointError(TPLoaderError, ValueError):
    """The checkpoint's files are missing, malformed or inconsistent."""


class ModelNotFoundError(CheckpointError, FileNotFoundError):
    """The model source names no directory, file or reachable Hub repository."""


class StaleShardsError(CheckpointError):
    """A pre-sharded directory (``save-sharded``) does not match this load: another world size, plan, dtype or
    format version, a source changed since, or a rank file missing, resized or altered."""


class PlanError(TPLoaderError, ValueError):
    """A plan file is malformed, names an unknown style, or no plan fits the model."""


class ShardingError(PlanError):
    """The model cannot be sharded over this world size (for example indivisible attention heads)."""


class StrictLoadError(TPLoaderError):
    """``strict=True`` and the checkpoint has missing, unexpected or mismatched keys."""


class ReadError(TPLoaderError, OSError):
    """Reading tensor bytes failed on some rank."""


class DistributedError(TPLoaderError, RuntimeError):
    """The process group could not be set up, or ranks disagree about what they see."""


class LostContactError(DistributedError):
    """A collective with other ranks failed or timed out: some rank died or hung. It is raised where it is met,
    without an agreement round, which would wait a second timeout for the same rank."""


_TYPES: dict[str, type[TPLoaderError]] = {
    cls.__name__: cls
    for cls in (
        TPLoaderError,
        ArgumentError,
        CheckpointError,
        ModelNotFoundError,
        StaleShardsError,
        PlanError,
        ShardingError,
        StrictLoadError,
        ReadError,
        DistributedError,
        LostContactError,
    )
}


def from_wire(wire: dict[str, Any]) -> TPLoaderError:
    """Rebuilds an error described by :meth:`TPLoaderError.to_wire`."""
    cls = _TYPES.get(wire["type"], TPLoaderError)
    return cls(wire["message"], file=wire["file"], key=wire["key"], rank=wire["rank"], hint=wire["hint"])


def as_loader_error(exc: BaseException, rank: int) -> TPLoaderError:
    """Wraps any exception met on ``rank`` as a :class:`TPLoaderError` that every rank can raise."""
    if isinstance(exc, TPLoaderError):
        return exc.with_rank(rank)
    return TPLoaderError(
        f"unexpected {type(exc).__name__}: {short_text(str(exc))}",
        rank=rank,
        hint="This is likely a bug in tp_loader; please report it with the traceback logged on that rank",
    )


def short_repr(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, with the full length stated when cut (config values
    end up in error messages that every rank gathers)."""
    try:
        text = repr(value)
    except ValueError:  # an int beyond Python's int-to-string digit limit
        return f"<integer of {value.bit_length()} bits>"
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


def short_text(text: str, limit: int = 200) -> str:
    """``text`` cut to ``limit`` characters, with its full length stated when cut."""
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"
