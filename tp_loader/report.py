"""Stage 7, report: one agreed account of the load, identical on every rank."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from ._version import __version__
from .convert import Conversion
from .plan import LoadPlan, Mismatch, Skipped


@dataclass(frozen=True)
class TieReport:
    """A tied pair: which side was stored (``both``/``source``/``target``/``neither``) and, when both
    were, whether they held the same values (``None`` otherwise)."""

    source: str
    target: str
    stored: str
    identical: bool | None


@dataclass(frozen=True)
class RankReport:
    """What one rank did.

    Attributes:
        rank: the rank (global when the mesh has replicas).
        bytes_read: bytes this rank read from storage during the load: slices copied out of the files
            (``preadv``, a dtype conversion, the ``safetensors`` reader), plus the bytes of zero-copy views a
            later stage touched (a tie's two sides compared). Mapped bytes are not in it (earlier versions counted
            them here).
        num_tensors: tensors it holds.
        read_seconds: its read (and, with ``share="job"``, exchange) time.
        seconds: from the call to the report.
        zero_copy_tensors: how many of its tensors are views of a file mapping.
        node: its node's name (``TP_LOADER_NODE`` or the host name).
        replica: its coordinate on the replicas' dimension (0 without replicas).
        bytes_received: bytes of shards it received from other ranks instead of reading (``share="job"``).
        bytes_planned: bytes of its slices (``LoadPlan.read_bytes``), however they arrive: read, mapped or
            received.
        bytes_mapped: bytes of its slices left as views of the page cache (zero-copy), read from storage only
            when first touched, after the load.
        plan_seconds: from the call to the agreed plan (resolve, headers, plan, agreement).
        place_seconds: making its DTensors.
        tie_seconds: tying keys and comparing a tie's two stored sides.
    """

    rank: int
    bytes_read: int
    num_tensors: int
    read_seconds: float
    seconds: float
    zero_copy_tensors: int = 0
    node: str = ""
    replica: int = 0
    bytes_received: int = 0
    bytes_planned: int = 0
    bytes_mapped: int = 0
    plan_seconds: float = 0.0
    place_seconds: float = 0.0
    tie_seconds: float = 0.0


@dataclass(frozen=True)
class StageSeconds:
    """One rank's seconds in the stages around the read (the read's own are in its ``ReadStats``)."""

    plan: float = 0.0
    place: float = 0.0
    tie: float = 0.0


def rank_reports(
    gathered: list[tuple[Any, float, int]],
    nodes: tuple[str, ...],
    replica_of: dict[int, int],
    stages: list[StageSeconds] | None = None,
) -> list[RankReport]:
    """One :class:`RankReport` per rank, in rank order.

    Args:
        gathered: each rank's read statistics (``ReadStats``), seconds since the call, and bytes received.
        nodes: each rank's node name (empty: not known).
        replica_of: each rank's replica (absent: 0).
        stages: each rank's seconds in the other stages (``None``: not measured, zeros).
    """
    return [
        RankReport(
            rank=r,
            bytes_read=stats.bytes_read,
            num_tensors=stats.num_tensors,
            read_seconds=stats.seconds,
            seconds=seconds,
            zero_copy_tensors=stats.zero_copy_tensors,
            node=nodes[r] if nodes else "",
            replica=replica_of.get(r, 0),
            bytes_received=received,
            bytes_planned=stats.bytes_planned,
            bytes_mapped=stats.bytes_mapped,
            plan_seconds=stages[r].plan if stages else 0.0,
            place_seconds=stages[r].place if stages else 0.0,
            tie_seconds=stages[r].tie if stages else 0.0,
        )
        for r, (stats, seconds, received) in enumerate(gathered)
    ]


@dataclass(frozen=True)
class Placement:
    """How one loaded tensor is placed: its style, the DTensor's global shape and placement, its stored
    dtype, and (in a dry run, which plans every rank) each rank's local shape."""

    key: str
    style: str
    shape: tuple[int, ...]
    placement: str
    dtype: str
    local_shapes: tuple[tuple[int, ...], ...] = ()


@dataclass(frozen=True)
class KeyAccount:
    """What a load does with the checkpoint's keys: the part that a load report and a dry run share.

    Attributes:
        model: the checkpoint directory.
        plan: the plan's name.
        world_size: tensor-parallel degree.
        dtype: requested dtype (``None``: as stored).
        prefix: the prefix of the checkpoint's base-model keys (``""``: a base model saved alone).
        groups: the plan's task heads and optional modules the checkpoint has (``causal_lm``, ``pooler``).
        num_tensors: stored tensors loaded (tied aliases not counted).
        missing_keys: tensors the config and plan imply that the checkpoint lacks.
        unexpected_keys: stored tensors the config and plan do not imply (loaded replicated).
        unmatched_keys: the unexpected keys that no plan rule matched.
        mismatched_keys: stored tensors whose shape contradicts the config (not loaded).
        ties: tied pairs.
        notes: key → remark on how it was placed (for example KV heads replicated).
        unused_rules: plan rule patterns that matched no stored or expected key (likely typos).
        conversions: for every target tensor a converter made, its stored source keys, op chain and placement.
        placements: every loaded tensor's placement, in load order.
        version: the tp_loader version.
        skipped: stored keys no model of the architecture runs (the plan's ``[[skip]]`` entries): never read
            nor placed; each entry's name, reason, keys and stored bytes (``keep=`` loads them).
    """

    model: str
    plan: str
    world_size: int
    dtype: str | None
    prefix: str
    groups: tuple[str, ...]
    num_tensors: int
    missing_keys: tuple[str, ...]
    unexpected_keys: tuple[str, ...]
    unmatched_keys: tuple[str, ...]
    mismatched_keys: tuple[Mismatch, ...]
    ties: tuple[TieReport, ...]
    notes: tuple[tuple[str, str], ...]
    unused_rules: tuple[str, ...]
    conversions: tuple[Conversion, ...]
    placements: tuple[Placement, ...]
    version: str
    skipped: tuple[Skipped, ...]

    @property
    def clean(self) -> bool:
        """No missing, unexpected or mismatched keys, and no tied pair stored with different values."""
        return not (
            self.missing_keys
            or self.unexpected_keys
            or self.mismatched_keys
            or any(t.identical is False for t in self.ties)
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        data = asdict(self)
        data["notes"] = dict(self.notes)
        data["clean"] = self.clean
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def _headline(self) -> str:
        prefix = f"keys prefixed {self.prefix!r}" if self.prefix else "keys without prefix"
        heads = f", heads: {', '.join(self.groups)}" if self.groups else ""
        return f"  plan {self.plan} ({prefix}{heads}), world size {self.world_size}, dtype {self.dtype or 'as stored'}"

    def _sections(self, full: bool) -> list[str]:
        unmatched = set(self.unmatched_keys)
        sections = [
            ("missing keys", list(self.missing_keys)),
            (
                "unexpected keys (loaded replicated)",
                [k + (" (no plan rule)" if k in unmatched else "") for k in self.unexpected_keys],
            ),
            ("mismatched keys (not loaded)", [m.describe() for m in self.mismatched_keys]),
            (
                "ties",
                [
                    f"{t.target} -> {t.source} (stored: {t.stored}"
                    + ("" if t.identical is None else ", identical" if t.identical else ", VALUES DIFFER")
                    + ")"
                    for t in self.ties
                ],
            ),
            (
                "skipped keys (not read: no model runs them; keep= loads them)",
                [f"{s.name}: {len(s.keys)} keys, {_size(s.nbytes)} ({s.reason})" for s in self.skipped],
            ),
            ("notes", [f"{k}: {v}" for k, v in self.notes]),
            ("plan rules that matched nothing", list(self.unused_rules)),
            (
                "conversions",
                [f"{c.target} <- {', '.join(c.sources)} ({c.op}; {c.placement})" for c in self.conversions],
            ),
        ]
        lines: list[str] = []
        for title, rows in sections:
            if rows:
                shown = rows if full or len(rows) <= MAX_ROWS else rows[:MAX_ROWS]
                lines += ["", f"  {title} ({len(rows)}):"] + [f"    {row}" for row in shown]
                if len(shown) < len(rows):
                    lines.append(f"    … {len(rows) - len(shown)} more: all in the JSON report (--report) and at -v")
        return lines


#: Rows of each key list that a table shows unless asked for all of them.
MAX_ROWS = 10


@dataclass(frozen=True)
class LoadReport(KeyAccount):
    """The outcome of a load, the same object on every rank (see :class:`KeyAccount` for the keys).

    Attributes:
        device: device type shards were placed on.
        ranks: per-rank accounting, in rank order.
    """

    device: str
    ranks: tuple[RankReport, ...]

    @property
    def seconds(self) -> float:
        """Wall time of the slowest rank, from the call to the report."""
        return max(r.seconds for r in self.ranks)

    @property
    def read_seconds(self) -> float:
        """Time the slowest reader took to read its shards."""
        return max(r.read_seconds for r in self.ranks)

    @property
    def bytes_planned(self) -> int:
        """Bytes of every rank's slices together, however they arrived (read, mapped or received)."""
        return sum(r.bytes_planned for r in self.ranks)

    @property
    def bytes_read(self) -> int:
        """Bytes read from storage during the load by all ranks together (mapped bytes are not)."""
        return sum(r.bytes_read for r in self.ranks)

    @property
    def bytes_mapped(self) -> int:
        """Bytes left as zero-copy views of the page cache by all ranks together, read when first touched."""
        return sum(r.bytes_mapped for r in self.ranks)

    @property
    def bytes_read_per_node(self) -> dict[str, int]:
        """Bytes each node's ranks read from storage during the load, by node name in rank order."""
        out: dict[str, int] = {}
        for r in self.ranks:
            out[r.node] = out.get(r.node, 0) + r.bytes_read
        return out

    @property
    def bytes_received(self) -> int:
        """Bytes of shards that moved between ranks instead of being read (``share="job"``)."""
        return sum(r.bytes_received for r in self.ranks)

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data["seconds"] = self.seconds
        data["read_seconds"] = self.read_seconds
        data["bytes_planned"] = self.bytes_planned
        data["bytes_read"] = self.bytes_read
        data["bytes_mapped"] = self.bytes_mapped
        data["bytes_read_per_node"] = self.bytes_read_per_node
        return data

    def summary(self) -> str:
        """The headline: what was read (with a throughput), what was mapped (with none: no byte of it was read
        yet), and the slowest rank's time, as ``12.00 GiB read in 3.10 s (3.87 GiB/s), 4.40 GiB mapped``."""
        read, mapped, seconds = self.bytes_read, self.bytes_mapped, self.read_seconds
        parts = []
        if read or not mapped:
            rate = f" ({_size(read / seconds)}/s)" if read and seconds > 0 else ""
            parts.append(f"{_size(read)} read in {seconds:.2f} s{rate}")
        if mapped:
            parts.append(f"{_size(mapped)} mapped (read when first touched)" + ("" if read else f" in {seconds:.2f} s"))
        return (
            f"{self.num_tensors} tensors, {_size(self.bytes_planned)} planned: {', '.join(parts)}; "
            f"{self.seconds:.2f} s in all (slowest rank)"
        )

    def format_table(self, *, full: bool = False) -> str:
        """A human-readable summary, as rank 0 prints it; key lists are cut to :data:`MAX_ROWS` rows
        unless ``full``."""
        received = f"  {'received':>12}  node" if self.bytes_received else ""
        lines = [
            f"tp_loader: {self.model}",
            self._headline() + f", device {self.device}",
            "  " + self.summary(),
            "",
            f"  {'rank':>4}  {'tensors':>7}  {'planned':>12}  {'read':>12}  {'mapped':>12}  {'plan s':>7}  "
            f"{'read s':>7}  {'place s':>7}  {'total s':>7}" + received,
        ]
        lines += [
            f"  {r.rank:>4}  {r.num_tensors:>7}  {_size(r.bytes_planned):>12}  {_size(r.bytes_read):>12}  "
            f"{_size(r.bytes_mapped):>12}  {r.plan_seconds:>7.3f}  {r.read_seconds:>7.3f}  {r.place_seconds:>7.3f}  "
            f"{r.seconds:>7.3f}" + (f"  {_size(r.bytes_received):>12}  {r.node}" if self.bytes_received else "")
            for r in self.ranks
        ]
        if self.bytes_received:
            per_node = ", ".join(f"{node} {_size(n)}" for node, n in self.bytes_read_per_node.items())
            lines.append(f"  read from storage per node: {per_node}; {_size(self.bytes_received)} exchanged")
        return "\n".join(lines + self._sections(full))


def placements(plan: LoadPlan, local_shapes: list[list[tuple[int, ...]]] | None = None) -> tuple[Placement, ...]:
    """Every tensor's placement under ``plan`` (with each rank's local shape when given, per rank in
    plan order)."""
    out = []
    names: dict[Any, str] = {}  # a dtype or a sharded dim → its name, made once (92k tensors share a few)
    for i, item in enumerate(plan.tensors):
        dim, dtype = item.slice.dim, item.info.dtype
        if dim not in names:
            names[dim] = "Replicate()" if dim is None else f"Shard({dim})"
        if dtype not in names:
            names[dtype] = str(dtype).removeprefix("torch.")
        shapes = tuple(per_rank[i] for per_rank in local_shapes) if local_shapes else ()
        out.append(Placement(item.key, item.style, tuple(item.slice.global_shape), names[dim], names[dtype], shapes))
    return tuple(out)


def key_account(plan: LoadPlan, *, dtype: str | None, tie_equal: list[list[bool]] | None = None) -> dict[str, Any]:
    """The :class:`KeyAccount` fields of ``plan`` (identical on every rank), as keyword arguments.

    Args:
        tie_equal: per rank, for each tie stored on both sides, whether that rank's shards were equal
            (``None``: not known, as in a dry run).
    """
    both = [t for t in plan.ties if t.stored == "both"]
    identical = (
        {(t.source, t.target): all(per_rank[i] for per_rank in tie_equal) for i, t in enumerate(both)}
        if tie_equal is not None
        else {}
    )
    return dict(
        model=plan.model,
        plan=plan.plan_name,
        world_size=plan.world_size,
        dtype=dtype,
        prefix=plan.prefix,
        groups=plan.groups,
        num_tensors=len(plan.tensors) - sum(t.stored == "both" for t in plan.ties),
        missing_keys=plan.missing,
        unexpected_keys=plan.unexpected,
        unmatched_keys=plan.unmatched,
        mismatched_keys=plan.mismatched,
        ties=tuple(TieReport(t.source, t.target, t.stored, identical.get((t.source, t.target))) for t in plan.ties),
        notes=tuple(sorted(plan.notes.items())),
        unused_rules=plan.unused_rules,
        conversions=plan.conversions,
        placements=placements(plan),
        version=__version__,
        skipped=plan.skipped,
    )


def build_report(
    plan: LoadPlan, *, dtype: str | None, device: str, ranks: list[RankReport], tie_equal: list[list[bool]]
) -> LoadReport:
    """Builds the report from this rank's plan (identical on every rank) and every rank's accounting.

    Args:
        tie_equal: per rank, for each tie stored on both sides, whether that rank's shards were equal.
    """
    return LoadReport(**key_account(plan, dtype=dtype, tie_equal=tie_equal), device=device, ranks=tuple(ranks))


def _size(nbytes: float) -> str:
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{nbytes} B"


@dataclass(frozen=True)
class RankPlan:
    """What one rank of a dry run would do.

    Attributes:
        rank: the rank.
        bytes_read: bytes it would read (its slices, plus widened reads and scale blocks).
        num_tensors: tensors it would hold.
        shard_bytes: bytes of its shards in the target dtype.
        peak_bytes: an upper bound on the memory its load holds at once: the shards plus the reads in
            flight (at most ``TP_LOADER_MAX_INFLIGHT_BYTES``).
    """

    rank: int
    bytes_read: int
    num_tensors: int
    shard_bytes: int
    peak_bytes: int


@dataclass(frozen=True)
class PlanSummary(KeyAccount):
    """A dry run: every rank planned in one process, with no process group and no tensor data read.
    Its JSON is a load report's keys with ``ranks`` holding :class:`RankPlan` rows, and each
    placement carrying every rank's local shape."""

    ranks: tuple[RankPlan, ...]

    def format_table(self, *, full: bool = False) -> str:
        """The dry run as text: per-rank totals, then one aligned row per tensor with every rank's
        piece (``start:stop`` along the sharded dim)."""
        lines = [
            f"tp_loader dry run: {self.model}",
            self._headline() + "; no process group, no tensor data read",
            "",
            f"  {'rank':>4}  {'tensors':>7}  {'bytes read':>12}  {'shards':>12}  {'peak at most':>12}",
        ]
        lines += [
            f"  {r.rank:>4}  {r.num_tensors:>7}  {_size(r.bytes_read):>12}  {_size(r.shard_bytes):>12}  "
            f"{_size(r.peak_bytes):>12}"
            for r in self.ranks
        ]
        rows = [
            (p.key, p.style, "x".join(map(str, p.shape)) or "scalar", p.placement, _pieces(p)) for p in self.placements
        ]
        header = ("key", "style", "shape", "placement", "local shape per rank")
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]
        lines += ["", "  " + "  ".join(h.ljust(w) for h, w in zip(header, widths)) + "  " + header[4]]
        lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[4] for row in rows]
        return "\n".join(lines + self._sections(full))


def _pieces(placement: Placement) -> str:
    if placement.placement == "Replicate()":
        return "whole on every rank"
    return " ".join("x".join(map(str, shape)) for shape in placement.local_shapes)
