"""vLLM's own description of a model, as :mod:`tp_loader.vllm.layout` takes it.

Two things come from the model vLLM built, never from a table per architecture:

- each checkpoint key's parameter, shard and expert, through the model's own weight mapping
  (``hf_to_vllm_mapper``: its stacked params, renames and ignored keys; ``packed_modules_mapping`` where a model
  has no stacked entry) and its MoE layers' expert mapping;
- each parameter's layout on this rank, from its layer: ``output_sizes`` / partition sizes, ``tp_rank`` /
  ``tp_size``, KV head replicas, the vocabulary shard and its padding, the local experts.
"""

from __future__ import annotations

from torch import nn

from ..errors import PlanError
from .layout import Destination, Slot, Target

_QKV = ("q", "k", "v")


def _attribute(param: nn.Parameter, name: str) -> int | None:
    value = getattr(param, name, None)
    return value if isinstance(value, int) else None


def _qkv_slots(layer: nn.Module, param: nn.Parameter) -> tuple[Slot, ...]:
    """QKVParallelLinear: q split over ranks; k and v split, or one head shared by ``num_kv_head_replicas`` ranks."""
    dim = _attribute(param, "output_dim")
    q = layer.num_heads * layer.head_size
    k = layer.num_kv_heads * layer.head_size
    v = layer.num_kv_heads * layer.v_head_size
    kv_rank = layer.tp_rank // layer.num_kv_head_replicas  # ranks sharing one KV head read the same rows
    stored_kv = layer.total_num_kv_heads
    return (
        Slot("q", dim, 0, q, layer.tp_rank * q, layer.total_num_heads * layer.head_size),
        Slot("k", dim, q, k, kv_rank * k, stored_kv * layer.head_size),
        Slot("v", dim, q + k, v, kv_rank * v, stored_kv * layer.v_head_size),
    )


def _merged_slots(layer: nn.Module, param: nn.Parameter) -> tuple[Slot, ...]:
    """MergedColumnParallelLinear: each part of ``output_sizes`` split over ranks, parts stacked on the rank."""
    dim = _attribute(param, "output_dim")
    slots, offset = [], 0
    for index, size in enumerate(layer.output_sizes):
        length = size // layer.tp_size
        slots.append(Slot(index, dim, offset, length, layer.tp_rank * length, size))
        offset += length
    return tuple(slots)


def _split_slot(layer: nn.Module, param: nn.Parameter, dim: int) -> tuple[Slot, ...]:
    """A parameter split evenly over the layer's ranks along ``dim``."""
    length = param.shape[dim]
    return (Slot(None, dim, 0, length, layer.tp_rank * length, length * layer.tp_size),)


def _vocab(layer: nn.Module, param: nn.Parameter) -> tuple[tuple[Slot, ...], tuple[int, int] | None]:
    """VocabParallelEmbedding / ParallelLMHead: this rank's rows of the stored vocabulary, then zero padding rows."""
    indices = layer.shard_indices
    if indices.num_added_elements:
        raise PlanError(
            f"{type(layer).__name__} has {indices.num_added_elements} added vocabulary rows (LoRA extra vocabulary)",
            hint="Load with load_format='auto'",
        )
    rows = indices.org_vocab_end_index - indices.org_vocab_start_index
    slot = Slot(None, 0, 0, rows, indices.org_vocab_start_index, layer.org_vocab_size)
    return (slot,), ((rows, param.shape[0]) if rows < param.shape[0] else None)


def _experts(name: str, layer: nn.Module, param: nn.Parameter) -> Target:
    """RoutedExperts (FusedMoE): ``w13_weight`` ``[local experts, 2 * I / tp, H]`` holds each local expert's gate
    (``w1``) then up (``w3``) rows of this rank, ``w2_weight`` ``[local experts, H, I / tp]`` its down columns; with
    expert parallelism (``tp_size`` 1 for experts) a rank holds only the experts its expert map gives it."""
    config = layer.moe_config
    leaf = name.rpartition(".")[2]
    num_experts = config.num_logical_experts
    problem = None
    if leaf not in ("w13_weight", "w2_weight"):
        problem = f"expert parameter {leaf!r} (only w13_weight and w2_weight of unquantized experts are supported)"
    elif not config.is_act_and_mul or config.num_experts != num_experts:
        problem = "experts without a gated activation, or with redundant (EPLB) experts"
    elif layer.expert_map_manager.num_fused_shared_experts:
        problem = "shared experts fused into the routed ones"
    if problem is not None:
        raise PlanError(
            f"{name!r}: {problem} are not supported by tp_loader's vLLM loader",
            key=name,
            hint="Load this model with load_format='auto'",
        )
    tp_rank, tp_size = config.tp_rank, config.moe_parallel_config.tp_size
    local = {e: layer._map_global_expert_id_to_local_expert_id(e) for e in range(num_experts)}
    slots = []
    for expert, index in local.items():
        if index < 0:
            continue
        if leaf == "w13_weight":
            rows = param.shape[1] // 2
            for shard, offset in (("w1", 0), ("w3", rows)):
                slots.append(Slot(shard, 0, offset, rows, tp_rank * rows, rows * tp_size, expert, index))
        else:
            cols = param.shape[2]
            slots.append(Slot("w2", 1, 0, cols, tp_rank * cols, cols * tp_size, expert, index))
    elsewhere = frozenset(e for e, index in local.items() if index < 0)
    return Target(name, tuple(param.shape), param.dtype, type(layer).__name__, tuple(slots), None, elsewhere)


def describe_parameter(name: str, layer: nn.Module, param: nn.Parameter) -> Target:
    """The layout of ``param`` (named ``name``), a parameter of ``layer``, on this rank.

    Raises:
        PlanError: a layer kind the loader does not know that shards the parameter.
    """
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts
    from vllm.model_executor.layers.linear import (
        ColumnParallelLinear,
        MergedColumnParallelLinear,
        QKVParallelLinear,
        ReplicatedLinear,
        RowParallelLinear,
    )
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    if isinstance(layer, RoutedExperts):
        return _experts(name, layer, param)
    kind = type(layer).__name__
    shape = tuple(param.shape)
    zero_rows = None
    output_dim, input_dim = _attribute(param, "output_dim"), _attribute(param, "input_dim")
    if isinstance(layer, VocabParallelEmbedding) and output_dim is not None:
        slots, zero_rows = _vocab(layer, param)
    elif isinstance(layer, QKVParallelLinear) and output_dim is not None:
        slots = _qkv_slots(layer, param)
    elif isinstance(layer, MergedColumnParallelLinear) and output_dim is not None:
        slots = _merged_slots(layer, param)
    elif isinstance(layer, ColumnParallelLinear) and output_dim is not None:
        slots = _split_slot(layer, param, output_dim)
    elif isinstance(layer, RowParallelLinear) and input_dim is not None:
        slots = _split_slot(layer, param, input_dim)
    elif isinstance(layer, ReplicatedLinear) or (output_dim is None and input_dim is None):
        slots = (Slot(),)  # replicated: norms, a row-parallel bias, routers, a layer with tensor parallelism off
    else:
        raise PlanError(
            f"parameter {name!r} of a {kind} layer is sharded (output_dim={output_dim}, input_dim={input_dim}) in a "
            "way tp_loader's vLLM loader does not know",
            key=name,
            hint="Load this model with load_format='auto'",
        )
    return Target(name, shape, param.dtype, kind, slots, zero_rows)


def packed_map(model: nn.Module) -> dict[str, tuple[str, str | int]]:
    """``packed_modules_mapping`` as ``.part`` → (``.packed``, shard id): a QKV layer's parts are ``q``/``k``/``v``,
    any other's their index (as vLLM's stacked params name them)."""
    out: dict[str, tuple[str, str | int]] = {}
    for packed, parts in (getattr(model, "packed_modules_mapping", None) or {}).items():
        for index, part in enumerate(parts):
            shard: str | int = _QKV[index] if len(parts) == 3 and packed.endswith("qkv_proj") else index
            out[f".{part}."] = (f".{packed}.", shard)
    return out


def map_keys(model: nn.Module, keys: list[str], params: set[str]) -> dict[str, Destination | None]:
    """Each checkpoint key's destination through the model's own weight mapping (``None``: a key it ignores)."""
    from vllm.model_executor.models.utils import AutoWeightsLoader, WeightsMapper

    mapper = getattr(model, "hf_to_vllm_mapper", None) or WeightsMapper()
    mapper = mapper | AutoWeightsLoader.REMOVE_UNUSED_ROTARY_EMBEDS_MAPPER
    packed = packed_map(model)
    experts = expert_mappings(model)
    out: dict[str, Destination | None] = {}
    for key in keys:
        mapped = mapper._map_name_with_shard(key)
        if mapped is None:
            out[key] = None
            continue
        name, shard = mapped
        if name not in params and shard is None:
            for part, (whole, index) in packed.items():
                if part in name and name.replace(part, whole, 1) in params:
                    name, shard = name.replace(part, whole, 1), index
                    break
        if name not in params and shard is None:
            for prefix, param_prefix, mapping in experts:
                if not name.startswith(prefix):
                    continue
                for param_part, weight_part, expert, expert_shard in mapping:
                    if weight_part in name:
                        leaf = name.replace(weight_part, param_part).removeprefix(prefix)
                        out[key] = Destination(param_prefix + leaf, expert_shard, expert)
                        break
                break
            if key in out:
                continue
        out[key] = Destination(name, shard)
    return out


def expert_mappings(model: nn.Module) -> list[tuple[str, str, list[tuple[str, str, int, str]]]]:
    """Each RoutedExperts layer's own checkpoint mapping: ``(its layer name + ".", its parameters' prefix, [(param
    part, checkpoint part, expert id, shard id)])``, as its ``load_weights`` matches keys (``experts.3.up_proj.`` →
    ``experts.w13_``, expert 3, ``w3``)."""
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts

    return [
        (f"{module.layer_name}.", f"{path}.", module.get_expert_mapping())
        for path, module in model.named_modules()
        if isinstance(module, RoutedExperts)
    ]
