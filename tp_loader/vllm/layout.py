"""The vLLM room's plan stage: checkpoint keys + vLLM's parameter layouts → what this rank reads, and where it goes.

Pure (no vLLM import, no I/O, no process group): :mod:`tp_loader.vllm.describe` turns a vLLM model into
:class:`Target` records, and this module matches them with the checkpoint's headers into read plans of the
usual :class:`~tp_loader.plan.TensorPlan` kind, which the read stage reads straight into the parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..index import TensorInfo
from ..plan import TensorPlan
from ..styles import Slice


@dataclass(frozen=True)
class Slot:
    """One checkpoint tensor's place in one vLLM parameter on this rank.

    The destination is the parameter (or, for stacked experts, its ``local_expert`` row) narrowed to
    ``[offset, offset + length)`` along ``dim``; the rank reads ``[start, start + length)`` of the stored
    tensor along the same dim, whose full size there is ``stored``. ``dim=None``: the whole tensor, replicated.

    Attributes:
        shard: the shard id vLLM's weight mapping gives the key (``"q"``, ``0``, ``"w1"``), ``None`` for a
            parameter filled by one key.
        expert: the checkpoint's (global) expert id, for stacked expert parameters.
        local_expert: the expert's index in the parameter on this rank.
    """

    shard: str | int | None = None
    dim: int | None = None
    offset: int = 0
    length: int = 0
    start: int = 0
    stored: int = 0
    expert: int | None = None
    local_expert: int | None = None

    def region_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The destination region's shape in a parameter of local ``shape``."""
        inner = shape[1:] if self.local_expert is not None else shape
        if self.dim is None:
            return inner
        return inner[: self.dim] + (self.length,) + inner[self.dim + 1 :]

    def stored_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape the checkpoint must store this slot's tensor in."""
        region = self.region_shape(shape)
        if self.dim is None:
            return region
        return region[: self.dim] + (self.stored,) + region[self.dim + 1 :]


@dataclass(frozen=True)
class Target:
    """One vLLM parameter as its layer lays it out on this rank.

    Attributes:
        name: the parameter's name in the model.
        shape: its local shape.
        dtype: its dtype.
        layer: the layer's class name (for messages and the report).
        slots: what fills it.
        zero_rows: rows (dim 0) no checkpoint tensor fills and vLLM's own loader leaves zero (vocabulary padding).
        experts_elsewhere: global expert ids whose tensors other ranks hold (expert parallelism): not read here.
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    layer: str
    slots: tuple[Slot, ...]
    zero_rows: tuple[int, int] | None = None
    experts_elsewhere: frozenset[int] = frozenset()

    def slot(self, shard: str | int | None, expert: int | None) -> Slot | None:
        for slot in self.slots:
            if slot.shard == shard and slot.expert == expert:
                return slot
        return None


@dataclass(frozen=True)
class Destination:
    """A key's mapping through vLLM's weight mapper: the parameter, shard and expert it fills."""

    param: str
    shard: str | int | None = None
    expert: int | None = None


@dataclass(frozen=True)
class Fill:
    """One read of this rank: ``plan``'s slice of a stored tensor, into ``slot`` of parameter ``target``."""

    plan: TensorPlan
    target: str
    slot: Slot


@dataclass(frozen=True)
class VllmPlan:
    """What this rank reads, and every reason the load cannot go on.

    Attributes:
        fills: the reads, one per checkpoint key this rank needs.
        unfilled: ``parameter`` or ``parameter[shard]`` (``[expert, shard]``) that no checkpoint key fills.
        unmapped: checkpoint keys vLLM's mapping sends to no parameter of the model.
        mismatched: ``(key, parameter, stored shape, expected shape)``.
        ignored: keys the architecture ignores (vLLM's mapping drops them: rotary caches).
        tied: ``(key, parameter)``: keys stored for a parameter tied to one that another key fills.
        elsewhere: keys of experts other ranks hold.
    """

    fills: tuple[Fill, ...]
    unfilled: tuple[str, ...] = ()
    unmapped: tuple[str, ...] = ()
    mismatched: tuple[tuple[str, str, tuple[int, ...], tuple[int, ...]], ...] = ()
    ignored: tuple[str, ...] = ()
    tied: tuple[tuple[str, str], ...] = ()
    elsewhere: tuple[str, ...] = ()

    @property
    def bytes_sharded(self) -> int:
        """Bytes this rank reads of tensors it holds a slice of."""
        return sum(f.plan.nbytes for f in self.fills if f.slot.dim is not None)

    @property
    def bytes_replicated(self) -> int:
        """Bytes this rank reads of tensors every rank holds whole."""
        return sum(f.plan.nbytes for f in self.fills if f.slot.dim is None)


def _label(target: Target, slot: Slot) -> str:
    parts = [str(p) for p in (slot.expert, slot.shard) if p is not None]
    return f"{target.name}[{', '.join(parts)}]" if parts else target.name


def plan_fills(
    tensors: dict[str, TensorInfo],
    mapped: dict[str, Destination | None],
    targets: dict[str, Target],
    aliases: dict[str, str],
) -> VllmPlan:
    """Matches every checkpoint key with its slot.

    Args:
        tensors: the checkpoint's headers.
        mapped: each key's destination through vLLM's mapping (``None``: a key the architecture ignores).
        targets: the model's parameters on this rank, by name.
        aliases: a tied parameter's other names → the name ``targets`` holds it under.
    """
    fills: list[Fill] = []
    filled: set[tuple[str, str | int | None, int | None]] = set()
    unmapped: list[str] = []
    mismatched: list[tuple[str, str, tuple[int, ...], tuple[int, ...]]] = []
    ignored: list[str] = []
    tied: list[tuple[str, str]] = []
    elsewhere: list[str] = []

    def place(key: str, info: TensorInfo, target: Target, slot: Slot) -> None:
        expected = slot.stored_shape(target.shape)
        if tuple(info.shape) != expected:
            mismatched.append((key, _label(target, slot), tuple(info.shape), expected))
            return
        ranges = () if slot.dim is None else ((slot.start, slot.start + slot.length),)
        piece = Slice(slot.dim, ranges, tuple(info.shape))
        fills.append(Fill(TensorPlan(info, piece, "vllm", target.layer), target.name, slot))
        filled.add((target.name, slot.shard, slot.expert))

    for key, info in tensors.items():
        dest = mapped.get(key)
        if dest is None:
            ignored.append(key)
            continue
        if dest.param in aliases:
            tied.append((key, aliases[dest.param]))
            continue
        target = targets.get(dest.param)
        if target is not None and dest.expert in target.experts_elsewhere:
            elsewhere.append(key)
            continue
        slot = target.slot(dest.shard, dest.expert) if target is not None else None
        if target is None or slot is None:
            unmapped.append(key)
            continue
        place(key, info, target, slot)
    # a tied parameter's other key fills it when the checkpoint stores only that side (an LM head, no embedding)
    for key, name in tied:
        slot = targets[name].slot(mapped[key].shard, None)  # type: ignore[union-attr]
        if slot is not None and (name, slot.shard, None) not in filled:
            place(key, tensors[key], targets[name], slot)
    unfilled = tuple(
        _label(target, slot)
        for target in targets.values()
        for slot in target.slots
        if (target.name, slot.shard, slot.expert) not in filled
    )
    return VllmPlan(
        tuple(fills), unfilled, tuple(unmapped), tuple(mismatched), tuple(ignored), tuple(tied), tuple(elsewhere)
    )
