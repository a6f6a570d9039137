"""Stage 7, report: one agreed account of the load, identical on every rank."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from .convert import Conversion
from .plan import LoadPlan, Mismatch


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
    """What one rank did."""

    rank: int
    bytes_read: int
    num_tensors: int
    read_seconds: float
    seconds: float
    zero_copy_tensors: int = 0


@dataclass(frozen=True)
class LoadReport:
    """The outcome of a load, the same object on every rank.

    Attributes:
        model: the checkpoint directory.
        plan: the plan's name.
        world_size: tensor-parallel degree.
        dtype: requested dtype (``None``: as stored).
        device: device type shards were placed on.
        num_tensors: stored tensors loaded (tied aliases not counted).
        missing_keys: tensors the config and plan imply that the checkpoint lacks.
        unexpected_keys: stored tensors the config and plan do not imply (loaded replicated).
        unmatched_keys: the unexpected keys that no plan rule matched.
        mismatched_keys: stored tensors whose shape contradicts the config (not loaded).
        ties: tied pairs.
        notes: key → remark on how it was placed (for example KV heads replicated).
        ranks: per-rank accounting, in rank order.
        unused_rules: plan rule patterns that matched no stored or expected key (likely typos).
        conversions: for every target tensor a converter made, its stored source keys, op chain and placement.
    """

    model: str
    plan: str
    world_size: int
    dtype: str | None
    device: str
    num_tensors: int
    missing_keys: tuple[str, ...]
    unexpected_keys: tuple[str, ...]
    unmatched_keys: tuple[str, ...]
    mismatched_keys: tuple[Mismatch, ...]
    ties: tuple[TieReport, ...]
    notes: tuple[tuple[str, str], ...]
    ranks: tuple[RankReport, ...]
    unused_rules: tuple[str, ...] = ()
    conversions: tuple[Conversion, ...] = ()

    @property
    def clean(self) -> bool:
        """No missing, unexpected or mismatched keys, and no tied pair stored with different values."""
        return not (
            self.missing_keys
            or self.unexpected_keys
            or self.mismatched_keys
            or any(t.identical is False for t in self.ties)
        )

    @property
    def seconds(self) -> float:
        """Wall time of the slowest rank."""
        return max(r.seconds for r in self.ranks)

    @property
    def bytes_read(self) -> int:
        """Bytes read by all ranks together."""
        return sum(r.bytes_read for r in self.ranks)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        data = asdict(self)
        data["notes"] = dict(self.notes)
        data["clean"] = self.clean
        data["seconds"] = self.seconds
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def format_table(self) -> str:
        """A human-readable summary, as rank 0 prints it."""
        lines = [
            f"tp_loader: {self.model}",
            f"  plan {self.plan}, world size {self.world_size}, dtype {self.dtype or 'as stored'}, device {self.device}",
            f"  {self.num_tensors} tensors, {_size(self.bytes_read)} read in {self.seconds:.2f} s (slowest rank)",
            "",
            f"  {'rank':>4}  {'tensors':>7}  {'bytes read':>12}  {'read s':>7}  {'total s':>7}",
        ]
        lines += [
            f"  {r.rank:>4}  {r.num_tensors:>7}  {_size(r.bytes_read):>12}  {r.read_seconds:>7.3f}  {r.seconds:>7.3f}"
            for r in self.ranks
        ]
        sections = [
            ("missing keys", list(self.missing_keys)),
            (
                "unexpected keys (loaded replicated)",
                [k + (" (no plan rule)" if k in self.unmatched_keys else "") for k in self.unexpected_keys],
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
            ("notes", [f"{k}: {v}" for k, v in self.notes]),
            ("plan rules that matched nothing", list(self.unused_rules)),
            (
                "conversions",
                [f"{c.target} <- {', '.join(c.sources)} ({c.op}; {c.placement})" for c in self.conversions],
            ),
        ]
        for title, rows in sections:
            if rows:
                lines += ["", f"  {title}:"] + [f"    {row}" for row in rows]
        return "\n".join(lines)


def build_report(
    plan: LoadPlan, *, dtype: str | None, device: str, ranks: list[RankReport], tie_equal: list[list[bool]]
) -> LoadReport:
    """Builds the report from this rank's plan (identical on every rank) and every rank's accounting.

    Args:
        tie_equal: per rank, for each tie stored on both sides, whether that rank's shards were equal.
    """
    both = [t for t in plan.ties if t.stored == "both"]
    identical = {(t.source, t.target): all(per_rank[i] for per_rank in tie_equal) for i, t in enumerate(both)}
    ties = tuple(TieReport(t.source, t.target, t.stored, identical.get((t.source, t.target))) for t in plan.ties)
    return LoadReport(
        model=plan.model,
        plan=plan.plan_name,
        world_size=plan.world_size,
        dtype=dtype,
        device=device,
        num_tensors=len(plan.tensors) - sum(t.stored == "both" for t in plan.ties),
        missing_keys=plan.missing,
        unexpected_keys=plan.unexpected,
        unmatched_keys=plan.unmatched,
        mismatched_keys=plan.mismatched,
        ties=ties,
        notes=tuple(sorted(plan.notes.items())),
        ranks=tuple(ranks),
        unused_rules=plan.unused_rules,
        conversions=plan.conversions,
    )


def _size(nbytes: int) -> str:
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{nbytes} B"


def format_plans(plans: list[LoadPlan]) -> str:
    """What every rank of a planned load would read, one line per stored tensor: style, stored shape,
    placement and each rank's piece (``--dry-run``)."""
    first = plans[0]
    lines = [
        f"tp_loader dry run: {first.model}",
        f"  plan {first.plan_name}, world size {first.world_size}, no tensor data read",
        "",
    ]
    for items in zip(*(p.tensors for p in plans)):
        item = items[0]
        piece = item.slice
        placement = "Replicate()" if piece.dim is None else f"Shard({piece.dim})"
        if piece.dim is None:
            ranks = "whole on every rank"
        else:
            ranks = " ".join("+".join(f"{a}:{b}" for a, b in i.slice.ranges) for i in items)
        lines.append(
            f"  {item.key}  {item.style} {list(item.info.shape)} {placement}  {ranks}"
            + (f"  ({piece.note})" if piece.note else "")
        )
    lines += ["", "  bytes per rank: " + ", ".join(_size(p.read_bytes) for p in plans)]
    for title, keys in (
        ("missing keys", first.missing),
        ("unexpected keys (replicated)", first.unexpected),
        ("mismatched keys (not loaded)", [m.describe() for m in first.mismatched]),
    ):
        if keys:
            lines += [f"  {title}: {', '.join(keys)}"]
    return "\n".join(lines)
