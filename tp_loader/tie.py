"""Stage 6, tie: tied keys become one tensor object under both names."""

from __future__ import annotations

import torch

from .plan import TieDecision


def local_tie_equality(local: dict[str, torch.Tensor], ties: tuple[TieDecision, ...]) -> list[bool]:
    """For each tie whose both sides are stored, whether this rank's shards of the two are equal."""
    return [torch.equal(local[t.source], local[t.target]) for t in ties if t.stored == "both"]


def apply_ties(state_dict: dict[str, torch.Tensor], ties: tuple[TieDecision, ...]) -> None:
    """Maps the absent (or redundant) side of each tie to the stored tensor object, in place.

    When both sides are stored the source wins and the target's copy is dropped; whether the two
    differed is the report's business.
    """
    for tie in ties:
        if tie.stored in ("source", "both"):
            state_dict[tie.target] = state_dict[tie.source]
        elif tie.stored == "target":
            state_dict[tie.source] = state_dict[tie.target]
