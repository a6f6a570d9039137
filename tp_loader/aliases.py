"""The config alias table: names under which transformers' configs store one value.

transformers' configs map public names to stored ones (``attribute_map``): ``Qwen3MoeConfig`` saves
``num_local_experts`` and reads it back as ``num_experts``, GPT-2 saves ``n_embd`` for ``hidden_size``.
Plans name one of each group; a config that stores another gets the value under every name it lacks.
Add a group here when a plan needs a name some config stores under another.
"""

from __future__ import annotations

from typing import Any

#: Groups of config names for one value; a name the config lacks takes the first present one's value.
CONFIG_ALIASES: tuple[tuple[str, ...], ...] = (
    ("num_experts", "num_local_experts", "n_routed_experts"),
    ("hidden_size", "n_embd", "d_model"),
    ("num_attention_heads", "n_head", "n_heads"),
    ("num_hidden_layers", "n_layer", "n_layers"),
    ("max_position_embeddings", "n_positions"),
    ("num_experts_per_tok", "num_experts_per_token"),
    ("num_shared_experts", "n_shared_experts"),
)


def with_aliases(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with every name of an alias group it lacks set from the group's first present name."""
    out = dict(values)
    for group in CONFIG_ALIASES:
        present = next((name for name in group if name in values), None)
        if present is not None:
            for name in group:
                out.setdefault(name, values[present])
    return out
