"""Stage 6, tie: tied keys become one tensor object under both names."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .plan import TieDecision


def local_tie_equality(local: dict[str, torch.Tensor], ties: tuple[TieDecision, ...]) -> list[bool]:
    """For each tie whose both sides are stored, whether this rank's shards of the two are equal."""
    return [torch.equal(local[t.source], local[t.target]) for t in ties if t.stored == "both"]


def apply_ties(
    state_dict: dict[str, torch.Tensor], ties: tuple[TieDecision, ...], identical: Sequence[bool] = ()
) -> None:
    """Maps the absent side of each tie to the stored tensor object, in place.

    A tie stored on both sides is applied (the target's copy dropped for the source's) only where ``identical``
    (one flag per such tie, in order: equal on every rank) says the two are equal. Otherwise, or when not known,
    each keeps its own values, as transformers does: a config that ties them contradicts a checkpoint that
    stores them different, and dropping one would load a wrong tensor without an error.
    """
    flags = iter(identical)
    for tie in ties:
        if tie.stored == "both":
            if next(flags, False):
                state_dict[tie.target] = state_dict[tie.source]
        elif tie.stored == "source":
            state_dict[tie.target] = state_dict[tie.source]
        elif tie.stored == "target":
            state_dict[tie.source] = state_dict[tie.target]


def identical_everywhere(tie_equal: Sequence[Sequence[bool]]) -> list[bool]:
    """For each tie stored on both sides, whether its two sides were equal on every rank."""
    return [all(column) for column in zip(*tie_equal)] if tie_equal else []
