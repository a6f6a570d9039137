"""Quantized formats (tp_loader.quant): compressed-tensors (float-, int- and pack-quantized), GPTQ (v1,
symmetric and asymmetric, with and without act-order), AWQ GEMM, per-tensor / per-channel fp8 and MXFP4,
on a small linear stack (a colwise ``up`` then a rowwise ``down``, all-reduced) planned by a plan file
written here: every plan gets the formats.

Checkpoints: compressed-tensors' own compressors write those checkpoints and dequantize them
(the reference); transformers' ``Fp8Quantize`` / ``Fp8Dequantize`` write and dequantize the per-tensor
fp8 one, and its ``convert_moe_packed_tensors`` dequantizes MXFP4. No GPTQ or AWQ library installs on a
CPU machine (auto-gptq and autoawq ship CUDA builds; gptqmodel builds kernels), so those checkpoints
are written here following the published layouts (AutoGPTQ's ``QuantLinear.pack``, AutoAWQ's
``WQLinear_GEMM.from_linear``), with the integers kept before packing: the reference dequantization is
computed from them, never by unpacking. Expected shards come from each format's slicing rules written
out below (:data:`SHARDS`), independently of tp_loader.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from compressed_tensors.compressors.base import BaseCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
from compressed_tensors.quantization.utils.helpers import calculate_qparams
from reference import all_reduce, chunk_piece

import tp_loader
from tp_loader.demo import write_checkpoint
from tp_loader.testing import run_ranks, values

HIDDEN, INTER = 64, 128
STACK_PLAN = """
name = "quant_stack"
model_types = ["quant_stack"]
layers = "num_layers"

[[rules]]
pattern = "layers.*.up.*"
style = "colwise"
{transposed}
[[rules]]
pattern = "layers.*.down.*"
style = "rowwise"
{transposed}
[[tensors]]
key = "layers.{{layer}}.up.{name}"
shape = {up}

[[tensors]]
key = "layers.{{layer}}.down.{name}"
shape = {down}
"""
LAYERS = 2


def write_plan(root: Path, *, transposed: bool = False) -> Path:
    """The linear stack's plan: ``up.weight`` [inter, hidden] colwise, ``down.weight`` [hidden, inter]
    rowwise; transposed (MXFP4's ``[in, out]``): ``up.proj`` [hidden, inter], ``down.proj`` [inter, hidden]."""
    shapes = (["hidden_size", "intermediate_size"], ["intermediate_size", "hidden_size"])
    text = STACK_PLAN.format(
        transposed="transposed = true\n" if transposed else "",
        name="proj" if transposed else "weight",
        up=str(shapes[0] if transposed else shapes[1]).replace("'", '"'),
        down=str(shapes[1] if transposed else shapes[0]).replace("'", '"'),
    )
    path = root / ("stack_t.toml" if transposed else "stack.toml")
    path.write_text(text)
    return path


def float_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """The stack's float weights ``[out, in]``, by module."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for layer in range(LAYERS):
        out[f"layers.{layer}.up"] = torch.randn(INTER, HIDDEN, generator=generator) * 0.1
        out[f"layers.{layer}.down"] = torch.randn(HIDDEN, INTER, generator=generator) * 0.1
    return out


# --- writers: (stored tensors, quantization_config, reference dequantization by logical key) -----------


def compressed_tensors(
    fmt: str, weights: dict, *, input_scale: bool = False, modules: dict | None = None
) -> tuple[dict, dict, dict]:
    """Written and dequantized by compressed-tensors' compressor for ``fmt``; qparams by its
    ``calculate_qparams`` from each channel's, group's or the tensor's min and max."""
    args = QuantizationArgs(**weights)
    activations = QuantizationArgs(num_bits=8, type="float", strategy="tensor", dynamic=False) if input_scale else None
    scheme = QuantizationScheme(targets=["Linear"], weights=args, input_activations=activations)
    compressor = BaseCompressor.get_value_from_registry(fmt)
    stored, reference = {}, {}
    for module, weight in (modules or float_weights()).items():
        if args.strategy == "group":
            grouped = weight.unflatten(-1, (-1, args.group_size))
            low, high = grouped.amin(-1), grouped.amax(-1)
        elif args.strategy == "block":
            rows, cols = args.block_structure
            blocks = weight.unflatten(1, (-1, cols)).unflatten(0, (-1, rows))
            low, high = blocks.amin((1, 3)), blocks.amax((1, 3))
        elif args.strategy == "channel":
            low, high = weight.amin(-1, keepdim=True), weight.amax(-1, keepdim=True)
        else:
            low, high = weight.amin(), weight.amax()
        scale, zero_point = calculate_qparams(low, high, args)
        state = {"weight": weight, "weight_scale": scale, "weight_zero_point": zero_point}
        if input_scale:
            state["input_scale"] = torch.tensor([0.02])
        packed = compressor.compress(state, scheme)
        stored.update({f"{module}.{name}": tensor for name, tensor in packed.items()})
        reference[f"{module}.weight"] = compressor.decompress(packed, scheme)["weight"]
    config = QuantizationConfig(config_groups={"group_0": scheme}, format=fmt).model_dump(mode="json")
    return stored, config, reference


def pack_rows(ints: torch.Tensor, bits: int) -> torch.Tensor:
    """AutoGPTQ's packing: ``32 / bits`` consecutive rows into one int32 row, the first in the lowest bits."""
    per = 32 // bits
    rows = ints.to(torch.int64).unflatten(0, (-1, per))
    words = sum(rows[:, j] << (bits * j) for j in range(per))
    return (words - ((words >= 2**31).to(torch.int64) << 32)).to(torch.int32).contiguous()


def gptq(weights: dict, *, bits: int = 4, group: int = 32, sym: bool = True, act_order: bool = False) -> tuple:
    """GPTQ (AutoGPTQ, checkpoint_format "gptq"): per group min/max qparams; with act-order the input
    rows are assigned to groups in a random order (``g_idx``), as GPTQ's desc_act quantizes them."""
    maxq = 2**bits - 1
    stored, reference = {}, {}
    generator = torch.Generator().manual_seed(1)
    for module, weight in weights.items():
        out_features, in_features = weight.shape
        order = torch.randperm(in_features, generator=generator) if act_order else torch.arange(in_features)
        g_idx = torch.empty(in_features, dtype=torch.int32)
        g_idx[order] = torch.arange(in_features, dtype=torch.int32) // group
        groups = in_features // group
        scales, zeros = torch.empty(groups, out_features), torch.empty(groups, out_features, dtype=torch.int64)
        for g in range(groups):
            cols = weight[:, g_idx == g]
            low, high = cols.amin(1).clamp(max=0), cols.amax(1).clamp(min=0)
            if sym:
                scales[g] = torch.maximum(low.abs(), high) * 2 / maxq
                zeros[g] = (maxq + 1) // 2
            else:
                scales[g] = (high - low) / maxq
                zeros[g] = torch.round(-low / scales[g]).to(torch.int64)
        scales = scales.to(torch.float16)
        g = g_idx.long()
        q = torch.clamp(torch.round(weight.T / scales[g].float() + zeros[g]), 0, maxq).to(torch.int64)  # [in, out]
        stored[f"{module}.qweight"] = pack_rows(q, bits)
        stored[f"{module}.qzeros"] = pack_rows((zeros - 1).T.contiguous(), bits).T.contiguous()  # v1: zero - 1
        stored[f"{module}.scales"] = scales
        stored[f"{module}.g_idx"] = g_idx
        reference[f"{module}.weight"] = (scales[g].float() * (q - zeros[g]).float()).T
    config = {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group,
        "desc_act": act_order,
        "sym": sym,
        "checkpoint_format": "gptq",
    }
    return stored, config, reference


AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def pack_awq(ints: torch.Tensor) -> torch.Tensor:
    """AutoAWQ GEMM's packing: columns ``8c + AWQ_ORDER[j]`` into bits ``4j`` of word column c."""
    cols = ints.to(torch.int64).unflatten(1, (-1, 8))
    words = sum(cols[:, :, AWQ_ORDER[j]] << (4 * j) for j in range(8))
    return (words - ((words >= 2**31).to(torch.int64) << 32)).to(torch.int32).contiguous()


def awq(weights: dict, *, group: int = 32) -> tuple:
    """AWQ GEMM: asymmetric 4-bit per group of input rows (zero point), scales float16."""
    stored, reference = {}, {}
    for module, weight in weights.items():
        grouped = weight.T.unflatten(0, (-1, group))  # [groups, group, out]
        low, high = grouped.amin(1).clamp(max=0), grouped.amax(1).clamp(min=0)
        scales = ((high - low) / 15).to(torch.float16)
        zeros = torch.round(-low / scales.float()).to(torch.int64)
        g = torch.arange(weight.shape[1]) // group
        q = torch.clamp(torch.round(weight.T / scales[g].float()) + zeros[g], 0, 15).to(torch.int64)  # [in, out]
        stored[f"{module}.qweight"] = pack_awq(q)
        stored[f"{module}.qzeros"] = pack_awq(zeros)
        stored[f"{module}.scales"] = scales
        reference[f"{module}.weight"] = ((q - zeros[g]).float() * scales[g].float()).T
    return (
        stored,
        {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm"},
        reference,
    )


def fp8_scalar(weights: dict) -> tuple:
    """Per-tensor fp8 as some Llama-3 FP8 releases ship it (quant_method "fp8", activation_scheme
    "static"): ``weight_scale`` and ``input_scale`` scalars, ``weight = fp8 * weight_scale``."""
    stored, reference = {}, {}
    for module, weight in weights.items():
        scale = weight.abs().amax() / 448
        fp8 = (weight / scale).to(torch.float8_e4m3fn)
        stored |= {f"{module}.weight": fp8, f"{module}.weight_scale": scale, f"{module}.input_scale": scale * 3}
        reference[f"{module}.weight"] = fp8.float() * scale
    return stored, {"quant_method": "fp8", "activation_scheme": "static"}, reference


def fp8_transformers(weights: dict) -> tuple:
    """Per-tensor fp8 as transformers writes it without ``weight_block_size`` (its ``Fp8Quantize``:
    ``weight_scale_inv`` [1, 1]), dequantized by its ``Fp8Dequantize``."""
    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize, Fp8Quantize

    config = FineGrainedFP8Config(weight_block_size=None)
    quantizer = SimpleNamespace(quantization_config=config)
    stored, reference = {}, {}
    for module, weight in weights.items():
        out = Fp8Quantize(quantizer).convert({f"{module}.weight": weight})
        stored.update(out)
        reference[f"{module}.weight"] = Fp8Dequantize(quantizer)._dequantize_one(
            out[f"{module}.weight"], out[f"{module}.weight_scale_inv"], output_dtype=torch.float32
        )
    return stored, {**config.to_dict(), "quant_method": "fp8", "weight_block_size": None}, reference


def fp8_channel(weights: dict) -> tuple:
    """Per-channel fp8 as transformers' FbgemmFp8Linear holds it: ``weight_scale`` [out, 1] float32."""
    stored, reference = {}, {}
    for module, weight in weights.items():
        scale = weight.abs().amax(1, keepdim=True) / 448
        fp8 = (weight / scale).to(torch.float8_e4m3fn)
        stored |= {f"{module}.weight": fp8, f"{module}.weight_scale": scale}
        reference[f"{module}.weight"] = fp8.float() * scale
    return stored, {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0}, reference


def mxfp4(weights: dict) -> tuple:
    """MXFP4 as gpt-oss ships it: random e2m1 codes and e8m0 exponents, dequantized by transformers'
    ``convert_moe_packed_tensors`` (to ``[in, out]``)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    generator = torch.Generator().manual_seed(2)
    stored, reference = {}, {}
    for module, weight in weights.items():
        rows, cols = weight.shape
        codes = torch.randint(0, 16, (rows, cols // 32, 32), generator=generator, dtype=torch.uint8)
        blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
        scales = torch.randint(116, 123, (rows, cols // 32), generator=generator, dtype=torch.uint8)
        stored |= {f"{module}.proj_blocks": blocks, f"{module}.proj_scales": scales}
        reference[f"{module}.proj"] = convert_moe_packed_tensors(blocks[None], scales[None], dtype=torch.float32)[0]
    return stored, {"quant_method": "mxfp4"}, reference


# --- each format's slicing rules: stored name → (dim, logical features per index) for the colwise
# `up` (out rows sharded) and the rowwise `down` (in columns sharded); None: replicated ----------------
PER_CHANNEL = {"colwise": (0, 1), "rowwise": None}
VALUES = {"colwise": (0, 1), "rowwise": (1, 1)}
WHOLE = {"colwise": None, "rowwise": None}
GPTQ = {
    "qweight": {"colwise": (1, 1), "rowwise": (0, 8)},
    "qzeros": {"colwise": (1, 8), "rowwise": (0, 32)},
    "scales": {"colwise": (1, 1), "rowwise": (0, 32)},
    "g_idx": {"colwise": None, "rowwise": (0, 1)},
}
SHARDS = {
    "ct-fp8-tensor": {"weight": VALUES, "weight_scale": WHOLE, "input_scale": WHOLE},
    "ct-fp8-channel": {"weight": VALUES, "weight_scale": PER_CHANNEL},
    "ct-int8-channel": {"weight": VALUES, "weight_scale": PER_CHANNEL},
    "ct-fp8-block": {"weight": VALUES, "weight_scale": {"colwise": (0, 32), "rowwise": (1, 32)}},
    "ct-int4-group": {
        "weight_packed": {"colwise": (0, 1), "rowwise": (1, 8)},
        "weight_scale": {"colwise": (0, 1), "rowwise": (1, 32)},
        "weight_zero_point": {"colwise": (0, 8), "rowwise": (1, 32)},
        "weight_shape": WHOLE,
    },
    "ct-int4-channel": {
        "weight_packed": {"colwise": (0, 1), "rowwise": (1, 8)},
        "weight_scale": PER_CHANNEL,
        "weight_shape": WHOLE,
    },
    "gptq": GPTQ,
    "gptq-act-order": {
        **GPTQ,
        "qzeros": {"colwise": (1, 8), "rowwise": None},
        "scales": {"colwise": (1, 1), "rowwise": None},
    },
    "awq": {
        "qweight": {"colwise": (1, 8), "rowwise": (0, 1)},
        "qzeros": {"colwise": (1, 8), "rowwise": (0, 32)},
        "scales": {"colwise": (1, 1), "rowwise": (0, 32)},
    },
    "fp8-scalar": {"weight": VALUES, "weight_scale": WHOLE, "input_scale": WHOLE},
    "fp8-transformers": {"weight": VALUES, "weight_scale_inv": WHOLE},
    "fbgemm-fp8-channel": {"weight": VALUES, "weight_scale": PER_CHANNEL},
    "mxfp4": {
        "proj_blocks": {"colwise": (0, 1), "rowwise": (1, 32)},
        "proj_scales": {"colwise": (0, 1), "rowwise": (1, 32)},
    },
}


def make(name: str) -> tuple[dict, dict, dict]:
    weights = float_weights()
    ct = {"num_bits": 8, "type": "float", "symmetric": True}
    return {
        "ct-fp8-tensor": lambda: compressed_tensors("float-quantized", {**ct, "strategy": "tensor"}, input_scale=True),
        "ct-fp8-channel": lambda: compressed_tensors("float-quantized", {**ct, "strategy": "channel"}),
        "ct-int8-channel": lambda: compressed_tensors("int-quantized", {**ct, "type": "int", "strategy": "channel"}),
        "ct-fp8-block": lambda: compressed_tensors(
            "float-quantized", {**ct, "strategy": "block", "block_structure": [32, 32]}
        ),
        "ct-int4-group": lambda: compressed_tensors(
            "pack-quantized", {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 32}
        ),
        "ct-int4-channel": lambda: compressed_tensors(
            "pack-quantized", {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "channel"}
        ),
        "gptq": lambda: gptq(weights),
        "gptq-act-order": lambda: gptq(weights, sym=False, act_order=True),
        "awq": lambda: awq(weights),
        "fp8-scalar": lambda: fp8_scalar(weights),
        "fp8-transformers": lambda: fp8_transformers(weights),
        "fbgemm-fp8-channel": lambda: fp8_channel(weights),
        "mxfp4": lambda: mxfp4(weights),
    }[name]()


def write(root: Path, name: str) -> tuple[Path, Path, dict, dict]:
    """The format's checkpoint and plan; returns (checkpoint, plan, stored tensors, reference)."""
    stored, quantization, reference = make(name)
    config = {
        "model_type": "quant_stack",
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_layers": LAYERS,
        "quantization_config": quantization,
    }
    checkpoint = write_checkpoint(root / name, config, {k: v.contiguous() for k, v in stored.items()}, num_shards=2)
    return checkpoint, write_plan(root, transposed=name == "mxfp4"), stored, reference


def style(key: str) -> str:
    return "colwise" if ".up." in key else "rowwise"


def chunk(size: int, world_size: int, rank: int) -> tuple[int, int]:
    step = math.ceil(size / world_size)
    return min(rank * step, size), min((rank + 1) * step, size)


def expected_stored_shard(name: str, key: str, tensor: torch.Tensor, world_size: int, rank: int) -> torch.Tensor:
    """``key``'s shard by the format's slicing rule: the intermediate dim (INTER, the sharded one of
    both layers) chunked, divided by the stored tensor's features per index."""
    rule = SHARDS[name][key.rsplit(".", 1)[1]][style(key)]
    if rule is None:
        return tensor
    dim, per = rule
    start, stop = chunk(INTER, world_size, rank)
    return tensor.narrow(dim, start // per, (stop - start) // per)


def logical_dim(name: str, key: str) -> int:
    """The sharded dim of the logical weight: out rows of ``up``, in columns of ``down`` (swapped for
    MXFP4's ``[in, out]``)."""
    return (0 if style(key) == "colwise" else 1) ^ (name == "mxfp4")


def stack_forward(weights: dict, x: torch.Tensor, name: str, reduce) -> torch.Tensor:
    """``down(silu(up(x)))`` per layer, ``reduce`` after each row-parallel product."""
    for layer in range(LAYERS):
        if name == "mxfp4":
            up, down = weights[f"layers.{layer}.up.proj"], weights[f"layers.{layer}.down.proj"]
            x = x + reduce(torch.nn.functional.silu(x @ up) @ down)
        else:
            up, down = weights[f"layers.{layer}.up.weight"], weights[f"layers.{layer}.down.weight"]
            x = x + reduce(torch.nn.functional.silu(x @ up.T) @ down.T)
    return x


def _check_formats(rank: int, world_size: int, cases: list[tuple[str, Path, Path]]) -> dict[str, float]:
    """Per format: stored shards bitwise, dequantized shards equal to the reference's slices, and the
    TP forward's largest difference from the single-process one (returned)."""
    errors = {}
    x = torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(3))
    for name, root, plan in cases:
        stored, _, reference = make(name)
        loaded = tp_loader.load(root, plan=plan).state_dict
        assert set(loaded) == set(stored), name
        for key, tensor in stored.items():
            local = loaded[key].to_local()
            want = expected_stored_shard(name, key, tensor, world_size, rank).contiguous()
            assert local.dtype == tensor.dtype, (name, key)
            assert torch.equal(local.contiguous().reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)), (
                name,
                key,
            )  # bitwise
            assert tuple(loaded[key].shape) == tuple(tensor.shape), (name, key)
        result = tp_loader.load(root, plan=plan, dtype=torch.float32)
        dequantized = {k: v.to_local() for k, v in result.state_dict.items()}
        assert set(dequantized) == set(reference), name  # companions consumed
        for key, full in reference.items():
            assert dequantized[key].dtype == torch.float32
            assert torch.equal(dequantized[key], chunk_piece(full, world_size, rank, logical_dim(name, key))), (
                name,
                key,
            )
        tp = stack_forward(dequantized, x, name, all_reduce)
        errors[name] = float((tp - stack_forward(reference, x, name, lambda t: t)).abs().max())
    return errors


FORMATS = list(SHARDS)


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_every_format_shards_in_step_dequantizes_slices_and_runs_a_tp_forward(tmp_path: Path, world_size: int) -> None:
    cases = [(name, *write(tmp_path, name)[:2]) for name in FORMATS]
    for errors in values(run_ranks(world_size, _check_formats, cases)):
        assert errors.keys() == set(FORMATS)
        assert max(errors.values()) <= 1e-5, errors


def _check_world3(rank: int, world_size: int, cases: list[tuple[str, Path, Path]]) -> dict[str, str]:
    """Stored form: the formats whose words, groups or blocks 43-feature shards cut are refused (the
    message is returned, to compare across ranks); dequantized: every format loads, each slice equal
    to the reference's, even where a shard cuts a group."""
    refused = {}
    for name, root, plan in cases:
        try:
            tp_loader.load(root, plan=plan)
        except tp_loader.ShardingError as exc:
            refused[name] = str(exc)
        _, _, reference = make(name)
        local = {k: v.to_local() for k, v in tp_loader.load(root, plan=plan, dtype=torch.float32).state_dict.items()}
        for key, full in reference.items():
            assert torch.equal(local[key], chunk_piece(full, world_size, rank, logical_dim(name, key))), (name, key)
    return refused


def test_world_size_that_cuts_words_or_groups_is_refused_alike_on_every_rank_and_dequantizing_works(
    tmp_path: Path,
) -> None:
    """At world 3 the intermediate dim (128) splits 43, 43, 42: packed words of 8, groups and blocks of
    32 are cut; per-channel and per-tensor formats shard as stored."""
    cases = [(name, *write(tmp_path, name)[:2]) for name in FORMATS]
    refused = values(run_ranks(3, _check_world3, cases))
    assert refused[0] == refused[1] == refused[2]
    assert sorted(refused[0]) == [
        "awq",
        "ct-fp8-block",
        "ct-int4-channel",
        "ct-int4-group",
        "gptq",
        "gptq-act-order",
        "mxfp4",
    ]


HINT = "; or load with a wider dtype (dtype=torch.bfloat16) to dequantize each slice on load"


@pytest.mark.parametrize(
    ("name", "message", "working"),
    [
        (
            "gptq",
            "weight layers.0.down.weight (gptq 4-bit, groups of 32, symmetric) cannot be sharded over 3 ranks as "
            "stored: rank 0's shard [0, 43) of dim 1 (size 128) cuts layers.0.down.qweight (packed int32 words of 8)",
            "1, 2, 4",
        ),
        (
            "gptq-act-order",  # the groups of act-order scales are not sharded: only the packed words count
            "weight layers.0.down.weight (gptq 4-bit, groups of 32, act-order) cannot be sharded over 3 ranks as "
            "stored: rank 0's shard [0, 43) of dim 1 (size 128) cuts layers.0.down.qweight (packed int32 words of 8)",
            "1, 2, 4, 8, 16, 17, 18",  # 17 and 18 ranks: 8 features each, the last ranks empty (torch.chunk)
        ),
        (
            "awq",
            "weight layers.0.down.weight (awq 4-bit, groups of 32) cannot be sharded over 3 ranks as stored: rank 0's "
            "shard [0, 43) of dim 1 (size 128) cuts layers.0.down.qzeros (groups of 32)",
            "1, 2, 4",
        ),
        (
            "ct-int4-group",
            "weight layers.0.down.weight (compressed-tensors pack-quantized 4-bit int, groups of 32, asymmetric) "
            "cannot be sharded over 3 ranks as stored: rank 0's shard [0, 43) of dim 1 (size 128) cuts "
            "layers.0.down.weight_packed (packed int32 words of 8)",
            "1, 2, 4",
        ),
        (
            "mxfp4",
            "weight layers.0.down.proj (mxfp4 (e2m1 values, e8m0 scales per 32)) cannot be sharded over 3 ranks as "
            "stored: rank 0's shard [0, 43) of dim 0 (size 128) cuts layers.0.down.proj_blocks (blocks of 32)",
            "1, 2, 4",
        ),
    ],
)
def test_refused_world_size_names_the_weight_the_cut_and_the_world_sizes_that_work(
    tmp_path: Path, name: str, message: str, working: str
) -> None:
    """Planned for every rank at once (no process group, no tensor data read): the first weight in file
    order whose shards cut its stored tensors' units; the working sizes fit every weight."""
    root, plan, _, _ = write(tmp_path, name)
    with pytest.raises(tp_loader.ShardingError) as info:
        tp_loader.plan_load(root, world_size=3, plan=plan)
    assert info.value.message == message
    assert info.value.key == message.split()[1]
    assert info.value.hint == f"World sizes that work: {working}{HINT}"


def test_act_order_rowwise_shards_carry_their_g_idx_and_replicate_scales_as_the_report_says(tmp_path: Path) -> None:
    root, plan, _, _ = write(tmp_path, "gptq-act-order")
    summary = tp_loader.plan_load(root, world_size=2, plan=plan)
    placements = {p.key: p.placement for p in summary.placements}
    assert [placements[f"layers.0.down.{n}"] for n in ("qweight", "g_idx", "scales", "qzeros")] == [
        "Shard(0)",
        "Shard(0)",
        "Replicate()",
        "Replicate()",
    ]
    assert dict(summary.notes)["layers.0.down.qweight"] == (
        "act-order (desc_act): input rows sharded with their g_idx entries; scales and qzeros replicated, "
        "since any rank's rows may use any group"
    )


def test_dequantized_weight_is_noted_and_reads_only_the_windows_of_its_shard(tmp_path: Path) -> None:
    """GPTQ at world 2, dequantized: rank 1's down slice (input features 64..127) reads qweight rows 8..15
    of [16, 64] int32, g_idx 64..127, scales [4, 64] float16 and qzeros [4, 8] of groups 2..3; its up
    slice (output features 64..127) reads columns 64..127 of qweight [8, 128] and scales [2, 128], words
    8..15 of qzeros [2, 16], and all of g_idx [64]."""
    root, plan, _, _ = write(tmp_path, "gptq")
    summary = tp_loader.plan_load(root, world_size=2, plan=plan, dtype="float32")
    down = 8 * 64 * 4 + 64 * 4 + 2 * 64 * 2 + 2 * 8 * 4
    up = 8 * 64 * 4 + 2 * 64 * 2 + 2 * 8 * 4 + 64 * 4
    assert summary.ranks[1].bytes_read == LAYERS * (down + up)
    assert dict(summary.notes)["layers.1.up.weight"] == (
        "dequantized on load from gptq 4-bit, groups of 32, symmetric "
        "(layers.1.up.qweight, layers.1.up.qzeros, layers.1.up.scales, layers.1.up.g_idx)"
    )
    assert {p.key for p in summary.placements} == set(make("gptq")[2])


def test_companion_of_the_wrong_shape_or_dtype_is_refused_naming_it(tmp_path: Path) -> None:
    stored, quantization, _ = gptq(float_weights())
    config = {"model_type": "quant_stack", "hidden_size": HIDDEN, "intermediate_size": INTER, "num_layers": LAYERS}
    config["quantization_config"] = quantization
    plan = write_plan(tmp_path)
    bad = {**stored, "layers.1.down.scales": stored["layers.1.down.scales"][:3].contiguous()}
    with pytest.raises(tp_loader.CheckpointError) as info:
        tp_loader.load(write_checkpoint(tmp_path / "shape", config, bad), plan=plan)
    assert info.value.message == (
        "gptq scales has shape [3, 64], but the weight layers.1.down.weight [64, 128] (gptq 4-bit, groups of 32, "
        "symmetric) needs [4, 64]"
    )
    assert info.value.key == "layers.1.down.scales"
    bad = {**stored, "layers.0.up.qzeros": stored["layers.0.up.qzeros"].to(torch.int64)}
    with pytest.raises(tp_loader.CheckpointError, match="gptq qzeros is stored as int64, not int32") as info:
        tp_loader.load(write_checkpoint(tmp_path / "dtype", config, bad), plan=plan)
    assert info.value.key == "layers.0.up.qzeros"


def test_missing_scales_are_reported_missing_and_stop_a_dequantizing_load(tmp_path: Path) -> None:
    stored, quantization, _ = gptq(float_weights())
    del stored["layers.1.up.scales"]
    config = {"model_type": "quant_stack", "hidden_size": HIDDEN, "intermediate_size": INTER, "num_layers": LAYERS}
    root = write_checkpoint(tmp_path / "ckpt", {**config, "quantization_config": quantization}, stored)
    plan = write_plan(tmp_path)
    assert tp_loader.load(root, plan=plan).report.missing_keys == ("layers.1.up.scales",)
    with pytest.raises(tp_loader.CheckpointError) as info:
        tp_loader.load(root, plan=plan, dtype="bfloat16")
    assert info.value.message == (
        "weight layers.1.up.weight (gptq 4-bit, groups of 32, symmetric) cannot be dequantized without "
        "layers.1.up.scales"
    )


def test_packed_values_of_the_wrong_shape_are_mismatched_with_their_companions(tmp_path: Path) -> None:
    """qweight for 120 input features where the config says 128: the weight's stored tensors are all
    mismatched (the config's shapes shown) and none is loaded."""
    stored, quantization, _ = gptq(float_weights())
    stored["layers.0.down.qweight"] = stored["layers.0.down.qweight"][:15].contiguous()
    config = {"model_type": "quant_stack", "hidden_size": HIDDEN, "intermediate_size": INTER, "num_layers": LAYERS}
    root = write_checkpoint(tmp_path / "ckpt", {**config, "quantization_config": quantization}, stored)
    report = tp_loader.load(root, plan=write_plan(tmp_path)).report
    assert [m.describe() for m in report.mismatched_keys] == [
        "layers.0.down.qweight (config implies [16, 64], stored [15, 64])",
        "layers.0.down.qzeros (config implies [4, 8], stored [4, 8])",
        "layers.0.down.scales (config implies [4, 64], stored [4, 64])",
        "layers.0.down.g_idx (config implies [128], stored [128])",
    ]


@pytest.mark.parametrize(
    ("quantization", "message"),
    [
        ({"quant_method": "gptq", "bits": 3, "group_size": 32}, "GPTQ with 3-bit weights is not supported"),
        ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"}, "GPTQ checkpoint_format 'marlin'"),
        ({"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemv"}, "AWQ version 'gemv'"),
    ],
)
def test_unsupported_variants_are_refused_before_any_read(tmp_path: Path, quantization: dict, message: str) -> None:
    stored, _, _ = gptq(float_weights())
    config = {"model_type": "quant_stack", "hidden_size": HIDDEN, "intermediate_size": INTER, "num_layers": LAYERS}
    root = write_checkpoint(tmp_path / "ckpt", {**config, "quantization_config": quantization}, stored)
    with pytest.raises(tp_loader.CheckpointError, match=message) as info:
        tp_loader.plan_load(root, world_size=2, plan=write_plan(tmp_path))
    assert info.value.key == "quantization_config"
    assert info.value.file == str(root / "config.json")


def quantized_llama(root: Path) -> tuple[Path, dict, dict, dict]:
    """A small llama (4 query heads, 2 KV heads of 16) whose projections compressed-tensors packs to
    asymmetric int4 in groups of 16; returns (checkpoint, config, stored tensors, float reference)."""
    from conftest import llama_config

    from tp_loader.demo import llama_tensors

    config = llama_config(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, vocab_size=101
    )
    tensors = llama_tensors(config)
    projections = {k.removesuffix(".weight"): v for k, v in tensors.items() if k.endswith("_proj.weight")}
    scheme = {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 16}
    packed, quantization, dequantized = compressed_tensors("pack-quantized", scheme, modules=projections)
    stored = {k: v for k, v in tensors.items() if k not in dequantized} | packed
    reference = {**{k: v for k, v in tensors.items() if k not in dequantized}, **dequantized}
    config = {**config, "quantization_config": quantization}
    return write_checkpoint(root, config, {k: v.contiguous() for k, v in stored.items()}), config, stored, reference


def _check_llama(rank: int, world_size: int, root: Path, config: dict) -> float:
    from reference import expected_shard, llama_forward, tp_llama_forward

    _, _, stored, reference = quantized_llama(root.parent / f"again{rank}")
    loaded = tp_loader.load(root).state_dict
    for kv in ("k_proj", "v_proj"):  # 2 KV heads at 4 ranks: each rank holds head rank // 2, packing intact
        for name in ("weight_packed", "weight_scale", "weight_zero_point"):
            key = f"model.layers.1.self_attn.{kv}.{name}"
            per = 8 if name == "weight_zero_point" else 1  # zero points: 8 rows (int4) a word
            want = stored[key][rank // 2 * 16 // per : (rank // 2 + 1) * 16 // per]
            assert torch.equal(loaded[key].to_local(), want), key
    local = {k: v.to_local() for k, v in tp_loader.load(root, dtype=torch.float32).state_dict.items()}
    for key, full in reference.items():
        assert torch.equal(local[key], expected_shard(key, full, config, world_size, rank)), key
    ids = torch.tensor([0, 5, 17, 42, 3, 99, 64, 7])
    return float(
        (tp_llama_forward(local, config, ids, world_size, rank) - llama_forward(reference, config, ids)).abs().max()
    )


def test_every_plan_gets_the_formats_llama_with_kv_heads_shared_by_ranks(tmp_path: Path) -> None:
    """The llama plan, unchanged: packed int4 shards on head boundaries (KV heads replicated 2x at world
    4, each rank's zero-point words those of its head), dequantized slices equal to the reference's,
    and the TP forward equal to the single-process one."""
    root, config, _, _ = quantized_llama(tmp_path / "llama")
    assert max(values(run_ranks(4, _check_llama, root, config))) <= 1e-5
