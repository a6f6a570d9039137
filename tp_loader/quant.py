"""Quantized formats: one table, format → how a weight's stored tensors are sliced, checked and dequantized.

Part of planning (pure, no I/O) and of reading (the dequantizers). A quantized weight is stored as
several tensors — its quantized values (packed words, fp8 or int8, fp4 blocks) and companions (scales,
zero points, group indices, shapes) — and planned as the one weight the plan expects (``X.weight``
``[out, in]``, or gpt-oss's ``experts.gate_up_proj`` ``[experts, in, out]``). Each stored tensor's
dims are :class:`Axis` of that logical weight: an output or input feature dim in units of ``factor``
features (a packed int32 word holds ``32 / bits`` of them, a group or block ``group`` of them, rounded
up), a leading (expert) dim, or a dim of fixed size. The plan's style shards the logical weight; each
stored tensor is then sliced on the axis that spans the sharded dim, in step, or replicated when none
does (a per-tensor scale, a per-channel scale of a rowwise weight, act-order scales).

- Stored form (no ``dtype``): a shard boundary inside a ``factor`` (a packed word, a group, a block)
  is a :class:`ShardingError` naming the weight and the world sizes that work, the same on every rank.
- Dequantized (a wider ``dtype``): each rank reads, for each of its ranges, the window of whole words,
  groups and blocks covering it, dequantizes that window (float32) and keeps its slice: the result is
  that slice of the whole weight's dequantization, whatever the world size.

Formats (``quantization_config.quant_method``): ``gptq``, ``awq`` (GEMM), ``compressed-tensors``
(``pack-quantized``, ``int-quantized``, ``float-quantized``), ``fp8`` without ``weight_block_size``
and ``fbgemm_fp8`` (per-tensor or per-channel scales), ``mxfp4`` (gpt-oss). Block fp8 (``fp8`` with
``weight_block_size``) is planned by :mod:`tp_loader.plan` (``weight_scale_inv`` blocks).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .errors import CheckpointError, ShardingError
from .index import TensorInfo
from .styles import Slice

OUT, IN = "out", "in"
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
FLOATS = (torch.float32, torch.float16, torch.bfloat16)
#: World sizes tried when an error lists those that work.
MAX_WORLD = 64


@dataclass(frozen=True)
class Axis:
    """One dim of a stored tensor: ``factor`` features of the logical weight's ``feature`` dim per index
    (rounded up; ``unit`` names what a factor is), or, with ``feature`` None, a dim of fixed ``size``."""

    feature: str | None
    factor: int = 1
    size: int = 1
    unit: str = ""


@dataclass(frozen=True)
class Companion:
    """One stored tensor of a quantized weight (the quantized values come first). ``lead``: it has the
    weight's leading (expert) dims in front of ``axes``; ``weight``: the dequantizer needs it (an input
    activation scale or a stored shape is only carried along in the stored form)."""

    role: str
    key: str
    axes: tuple[Axis, ...]
    dtypes: tuple[torch.dtype, ...]
    required: bool = True
    lead: bool = True
    weight: bool = True


@dataclass(frozen=True)
class Scheme:
    """How one weight is stored: its tensors, and what its dequantizer needs.

    Attributes:
        transposed: the logical weight is ``[..., in, out]`` (MXFP4, as transformers dequantizes it).
        zero_offset: added to stored zero points (GPTQ's v1 format stores zero - 1).
        strategy: scale granularity of compressed-tensors and fp8 (tensor, channel, group, block).
    """

    format: str
    describe: str
    companions: tuple[Companion, ...]
    dequantize: Callable[[Scheme, dict[str, torch.Tensor], tuple[int, ...], tuple[int, ...]], torch.Tensor]
    transposed: bool = False
    bits: int = 0
    group: int = 0
    zero_offset: int = 0
    strategy: str = ""
    block: tuple[int, ...] = ()
    act_order: bool = False


@dataclass(frozen=True)
class QuantWeight:
    """A weight the plan expects (``key``, logical ``shape``), stored quantized as ``scheme`` says."""

    key: str
    shape: tuple[int, ...]
    scheme: Scheme

    @property
    def primary(self) -> str:
        return self.scheme.companions[0].key

    def dim(self, feature: str) -> int:
        """The logical dim of ``out`` or ``in``."""
        return len(self.shape) - (1 if (feature == IN) != self.scheme.transposed else 2)

    def dims(self, companion: Companion) -> list[tuple[int | None, Axis]]:
        """Each stored dim of ``companion``: the logical dim it spans (None: fixed) and its axis."""
        lead = [(d, Axis("lead")) for d in range(len(self.shape) - 2)] if companion.lead else []
        return lead + [(None if a.feature is None else self.dim(a.feature), a) for a in companion.axes]

    def stored_shape(self, companion: Companion) -> tuple[int, ...]:
        """The shape ``companion`` has for this logical shape."""
        return tuple(a.size if d is None else -(-self.shape[d] // a.factor) for d, a in self.dims(companion))


@dataclass(frozen=True)
class Window:
    """One range of a dequantized slice: what to read of each stored tensor (``reads``), the logical
    window those reads cover (``origin``, ``region``), and the part of it to keep along ``dim``."""

    reads: tuple[tuple[str, TensorInfo, Slice], ...]
    origin: tuple[int, ...]
    region: tuple[int, ...]
    keep: tuple[int, int]


@dataclass(frozen=True)
class Dequantize:
    """A weight dequantized on load: its windows (one per range of the rank's slice), concatenated along
    ``dim``."""

    weight: QuantWeight
    dim: int | None
    windows: tuple[Window, ...]
    local_shape: tuple[int, ...]

    @property
    def read_bytes(self) -> int:
        return sum(
            math.prod(piece.local_shape(info.shape)) * info.dtype.itemsize
            for window in self.windows
            for _, info, piece in window.reads
        )


# --- the table ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Format:
    """One ``quant_method``: ``settings`` validates its ``quantization_config``; ``scheme`` tells how
    a weight the plan expects is stored (None: not stored quantized)."""

    name: str
    settings: Callable[[dict], dict]
    scheme: Callable[[dict, str, tuple[int, ...], dict[str, TensorInfo]], Scheme | None]


def _bad(message: str, hint: str = "tp_loader reads the formats listed in docs/architecture.md") -> CheckpointError:
    return CheckpointError(f"quantization_config: {message}", key="quantization_config", hint=hint)


def _int(config: dict, *names: str, default: int | None = None) -> int:
    for name in names:
        value = config.get(name)
        if value is not None:
            if not isinstance(value, int) or isinstance(value, bool):
                raise _bad(f"{name} = {value!r} is not an integer", "Fix config.json")
            return value
    if default is None:
        raise _bad(f"{names[0]} is missing", "Fix config.json")
    return default


def _packed_bits(bits: int, method: str, allowed: tuple[int, ...] = (2, 4, 8)) -> int:
    if bits not in allowed:
        raise _bad(
            f"{method} with {bits}-bit weights is not supported (words that hold whole values: "
            f"{', '.join(map(str, allowed))} bits)"
        )
    return bits


def _group(group: int, size: int) -> int:
    """A group size of -1 or 0 means one group over the whole input dim."""
    return size if group <= 0 else group


# GPTQ: qweight [in / (32/bits), out] packed along the input dim, qzeros [groups, out / (32/bits)],
# scales [groups, out], g_idx [in] (the group of each input row; act-order when desc_act).
def _gptq_settings(config: dict) -> dict:
    fmt = config.get("checkpoint_format") or config.get("format") or "gptq"
    if fmt not in ("gptq", "gptq_v2"):
        raise _bad(f"GPTQ checkpoint_format {fmt!r} is not supported (gptq, gptq_v2)")
    return {
        "bits": _packed_bits(_int(config, "bits"), "GPTQ"),
        "group": _int(config, "group_size", default=-1),
        "act_order": bool(config.get("desc_act", False)),
        "zero_offset": 1 if fmt == "gptq" else 0,
        "sym": bool(config.get("sym", True)),
    }


def _gptq_scheme(settings: dict, key: str, shape: tuple[int, ...], stored: dict[str, TensorInfo]) -> Scheme | None:
    base = key.removesuffix(".weight")
    if base == key or base + ".qweight" not in stored:
        return None
    bits, act_order = settings["bits"], settings["act_order"]
    group = _group(settings["group"], shape[-1])
    pack = Axis(IN, 32 // bits, unit="packed int32 word")
    groups = Axis(None, size=-(-shape[-1] // group)) if act_order else Axis(IN, group, unit="group")
    out_words = Axis(OUT, 32 // bits, unit="packed int32 word")
    return Scheme(
        "gptq",
        f"gptq {bits}-bit, groups of {group}{', act-order' if act_order else ''}"
        f"{', symmetric' if settings['sym'] else ''}",
        (
            Companion("qweight", base + ".qweight", (pack, Axis(OUT)), (torch.int32,)),
            Companion("qzeros", base + ".qzeros", (groups, out_words), (torch.int32,)),
            Companion("scales", base + ".scales", (groups, Axis(OUT)), FLOATS),
            Companion("g_idx", base + ".g_idx", (Axis(IN),), (torch.int32, torch.int64), required=act_order),
        ),
        _dequantize_gptq,
        bits=bits,
        group=group,
        zero_offset=settings["zero_offset"],
        act_order=act_order,
    )


# AWQ GEMM: qweight [in, out / 8] packed along the output dim in the order [0, 2, 4, 6, 1, 3, 5, 7],
# qzeros [groups, out / 8] packed alike, scales [groups, out].
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)


def _awq_settings(config: dict) -> dict:
    version = str(config.get("version", "gemm")).lower()
    if version != "gemm":
        raise _bad(f"AWQ version {version!r} is not supported (gemm)")
    return {
        "bits": _packed_bits(_int(config, "bits", "w_bit"), "AWQ", (4,)),
        "group": _int(config, "group_size", "q_group_size"),
    }


def _awq_scheme(settings: dict, key: str, shape: tuple[int, ...], stored: dict[str, TensorInfo]) -> Scheme | None:
    base = key.removesuffix(".weight")
    if base == key or base + ".qweight" not in stored:
        return None
    group = _group(settings["group"], shape[-1])
    words = Axis(OUT, 8, unit="packed int32 word")
    groups = Axis(IN, group, unit="group")
    return Scheme(
        "awq",
        f"awq 4-bit, groups of {group}",
        (
            Companion("qweight", base + ".qweight", (Axis(IN), words), (torch.int32,)),
            Companion("qzeros", base + ".qzeros", (groups, words), (torch.int32,)),
            Companion("scales", base + ".scales", (groups, Axis(OUT)), FLOATS),
        ),
        _dequantize_awq,
        bits=4,
        group=group,
    )


# compressed-tensors: a config group's scheme per module (targets: a class name such as "Linear", a
# module name, or "re:" + a regex matched at the start of the module name).
def _ct_settings(config: dict) -> dict:
    groups = config.get("config_groups") or {}
    if not isinstance(groups, dict):
        raise _bad("config_groups is not a table", "Fix config.json")
    return {"groups": groups, "format": config.get("format")}


def _ct_group(settings: dict, module: str) -> dict | None:
    """The config group that targets ``module``: by name, then by regex, then by class."""
    tiers: list[list[dict]] = [[], [], []]
    for group in settings["groups"].values():
        for target in group.get("targets") or []:
            target = str(target)
            if target == module:
                tiers[0].append(group)
            elif target.startswith("re:") and re.match(target[3:], module):
                tiers[1].append(group)
            elif "." not in target and target[:1].isupper():
                tiers[2].append(group)
    return next((tier[0] for tier in tiers if tier), None)


def _ct_scheme(settings: dict, key: str, shape: tuple[int, ...], stored: dict[str, TensorInfo]) -> Scheme | None:
    base = key.removesuffix(".weight")
    packed = base + ".weight_packed" in stored
    if base == key or not (packed or (key in stored and base + ".weight_scale" in stored)):
        return None
    group = _ct_group(settings, base)
    weights = (group or {}).get("weights")
    if not isinstance(weights, dict):
        raise CheckpointError(
            "compressed-tensors weight whose module no config group's targets name",
            key=key,
            hint="quantization_config.config_groups must target it (by class, name or 're:' pattern)",
        )
    fmt = group.get("format") or settings["format"] or ("pack-quantized" if packed else "")
    bits, kind = _int(weights, "num_bits"), str(weights.get("type", "int"))
    strategy, symmetric = str(weights.get("strategy", "tensor")), bool(weights.get("symmetric", True))
    size = _group(_int(weights, "group_size", default=-1), shape[-1]) if strategy == "group" else 0
    block = tuple(weights.get("block_structure") or ()) if strategy == "block" else ()
    if strategy not in ("tensor", "channel", "group", "block") or (strategy == "block" and len(block) != 2):
        raise _bad(
            f"compressed-tensors weight strategy {strategy!r} of {key} is not supported (tensor, channel, group, block)"
        )
    scale_axes = {
        "tensor": (Axis(None),),
        "channel": (Axis(OUT), Axis(None)),
        "group": (Axis(OUT), Axis(IN, size, unit="group")),
        "block": (
            Axis(OUT, block[0], unit="block") if block else Axis(OUT),
            Axis(IN, block[-1] if block else 1, unit="block"),
        ),
    }[strategy]
    lead = strategy != "tensor"
    extra = (
        Companion("input_scale", base + ".input_scale", (Axis(None),), FLOATS, False, False, False),
        Companion(
            "input_zero_point",
            base + ".input_zero_point",
            (Axis(None),),
            (torch.int8, torch.int32),
            False,
            False,
            False,
        ),
    )
    if packed:
        if fmt != "pack-quantized" or kind != "int":
            raise _bad(f"compressed-tensors format {fmt!r} ({kind}) of {key} is not supported with weight_packed")
        bits = _packed_bits(bits, "pack-quantized")
        word = Axis(IN, 32 // bits, unit="packed int32 word")
        zero_axes = (
            (Axis(OUT, 32 // bits, unit="packed int32 word"), scale_axes[1])
            if strategy in ("group", "channel")
            else scale_axes
        )
        companions = (
            Companion("weight_packed", base + ".weight_packed", (Axis(OUT), word), (torch.int32,)),
            Companion("weight_scale", base + ".weight_scale", scale_axes, FLOATS, lead=lead),
            Companion(
                "weight_zero_point",
                base + ".weight_zero_point",
                zero_axes,
                (torch.int32, torch.int8),
                not symmetric,
                lead,
            ),
            Companion(
                "weight_shape",
                base + ".weight_shape",
                (Axis(None, size=len(shape)),),
                (torch.int64, torch.int32),
                True,
                False,
                False,
            ),
        )
    else:
        if bits != 8 or kind not in ("int", "float"):
            raise _bad(
                f"compressed-tensors {bits}-bit {kind} weights of {key} are not supported unpacked (8-bit int or float)"
            )
        values = (torch.int8,) if kind == "int" else FP8
        companions = (
            Companion("weight", key, (Axis(OUT), Axis(IN)), values),
            Companion("weight_scale", base + ".weight_scale", scale_axes, FLOATS, lead=lead),
            Companion(
                "weight_zero_point",
                base + ".weight_zero_point",
                scale_axes,
                (torch.int8, torch.int32),
                not symmetric,
                lead,
            ),
        )
    detail = {"group": f"groups of {size}", "block": f"{'x'.join(map(str, block))} blocks"}.get(
        strategy, f"per {strategy}"
    )
    return Scheme(
        "compressed-tensors",
        f"compressed-tensors {fmt or 'quantized'} {bits}-bit {kind}, {detail}{'' if symmetric else ', asymmetric'}",
        companions + extra,
        _dequantize_ct,
        bits=bits,
        group=size,
        strategy=strategy,
        block=block,
    )


# fp8 with per-tensor or per-channel scales: weight fp8 [out, in]; weight_scale (or transformers'
# weight_scale_inv) [], [1], [1, 1] or [out, 1], a multiplier; input_scale / activation_scale [] or [1].
def _fp8_settings(config: dict) -> dict:
    return {}


def _fp8_scheme(settings: dict, key: str, shape: tuple[int, ...], stored: dict[str, TensorInfo]) -> Scheme | None:
    base = key.removesuffix(".weight")
    scale_key = next((base + s for s in (".weight_scale", ".weight_scale_inv") if base + s in stored), None)
    info = stored.get(key)
    if base == key or info is None or info.dtype not in FP8 or scale_key is None:
        return None
    scale = stored[scale_key].shape
    if scale == (shape[-2], 1):
        strategy, axes = "channel", (Axis(OUT), Axis(None))
    else:
        strategy, axes = "tensor", tuple(Axis(None) for _ in scale)  # [], [1] or [1, 1]: every stored form
    activation = next((base + s for s in (".input_scale", ".activation_scale") if base + s in stored), None)
    companions = (
        Companion("weight", key, (Axis(OUT), Axis(IN)), FP8),
        Companion("weight_scale", scale_key, axes, FLOATS, lead=False),
    )
    if activation is not None:
        axes = tuple(Axis(None) for _ in stored[activation].shape)
        companions += (Companion("input_scale", activation, axes, FLOATS, False, False, False),)
    return Scheme("fp8", f"fp8 per {strategy}", companions, _dequantize_ct, bits=8, strategy=strategy)


# MXFP4 (gpt-oss): X_blocks uint8 [..., rows, cols / 32, 16] (two e2m1 values a byte, low nibble first),
# X_scales uint8 [..., rows, cols / 32] (e8m0 exponents, bias 127); X is [..., cols, rows] once
# dequantized (transformers' convert_moe_packed_tensors transposes the last two dims).
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def _mxfp4_scheme(settings: dict, key: str, shape: tuple[int, ...], stored: dict[str, TensorInfo]) -> Scheme | None:
    if key + "_blocks" not in stored:
        return None
    block = Axis(IN, 32, unit="block")
    return Scheme(
        "mxfp4",
        "mxfp4 (e2m1 values, e8m0 scales per 32)",
        (
            Companion("blocks", key + "_blocks", (Axis(OUT), block, Axis(None, size=16)), (torch.uint8,)),
            Companion("scales", key + "_scales", (Axis(OUT), block), (torch.uint8,)),
        ),
        _dequantize_mxfp4,
        transposed=True,
        bits=4,
        group=32,
    )


FORMATS: dict[str, Format] = {
    "gptq": Format("gptq", _gptq_settings, _gptq_scheme),
    "awq": Format("awq", _awq_settings, _awq_scheme),
    "compressed-tensors": Format("compressed-tensors", _ct_settings, _ct_scheme),
    "fp8": Format("fp8", _fp8_settings, _fp8_scheme),
    "fbgemm_fp8": Format("fbgemm_fp8", _fp8_settings, _fp8_scheme),
    "mxfp4": Format("mxfp4", lambda config: {}, _mxfp4_scheme),
}


def quant_format(config: dict) -> tuple[Format, dict] | None:
    """The format of config.json's ``quantization_config`` with its validated settings, or None (not
    quantized, a method tp_loader leaves alone, or block fp8, which :mod:`tp_loader.plan` handles).

    Raises:
        CheckpointError: the settings are malformed or name a variant tp_loader does not read.
    """
    quant = config.get("quantization_config")
    if not isinstance(quant, dict):
        return None
    method = quant.get("quant_method")
    if method not in FORMATS or (method == "fp8" and quant.get("weight_block_size") is not None):
        return None
    return FORMATS[method], FORMATS[method].settings(quant)


def find_quantized(
    found: tuple[Format, dict] | None, stored: dict[str, TensorInfo], expected: dict[str, tuple[int, ...]]
) -> dict[str, QuantWeight]:
    """Every expected weight stored quantized, by the key of its quantized values. ``expected`` then
    names the stored tensors instead of the weight (each companion with the shape the weight implies;
    optional ones only when stored), so that missing and mismatched keys are the stored ones.

    Raises:
        CheckpointError: a weight's config group or variant is not supported.
    """
    if found is None:
        return {}
    fmt, settings = found
    weights: dict[str, QuantWeight] = {}
    for key, shape in list(expected.items()):
        if len(shape) < 2:
            continue
        scheme = fmt.scheme(settings, key, shape, stored)
        if scheme is None:
            continue
        weight = QuantWeight(key, shape, scheme)
        if key != weight.primary:
            del expected[key]
        for companion in scheme.companions:
            if companion.required or companion.key in stored:
                expected[companion.key] = weight.stored_shape(companion)
        weights[weight.primary] = weight
    return weights


# --- planning -----------------------------------------------------------------------------------------

PieceFor = Callable[[int, int], Slice]  # (world size, rank) → the logical weight's slice


def _stored(weight: QuantWeight, stored: dict[str, TensorInfo]) -> list[tuple[Companion, TensorInfo]]:
    """The weight's stored tensors, checked against the shapes and dtypes the format implies."""
    out = []
    for companion in weight.scheme.companions:
        info = stored.get(companion.key)
        if info is None:
            continue
        want = weight.stored_shape(companion)
        if info.shape != want:
            raise CheckpointError(
                f"{weight.scheme.format} {companion.role} has shape {list(info.shape)}, but the weight "
                f"{weight.key} {list(weight.shape)} ({weight.scheme.describe}) needs {list(want)}",
                file=info.file,
                key=companion.key,
                hint="The checkpoint's tensors do not match config.json's quantization_config or the model's sizes",
            )
        if info.dtype not in companion.dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in companion.dtypes)
            raise CheckpointError(
                f"{weight.scheme.format} {companion.role} is stored as {str(info.dtype).removeprefix('torch.')}, "
                f"not {names}",
                file=info.file,
                key=companion.key,
                hint="The checkpoint does not follow the format config.json's quantization_config names",
            )
        out.append((companion, info))
    return out


def _axis_on(weight: QuantWeight, companion: Companion, dim: int) -> tuple[int, Axis] | None:
    """The stored dim of ``companion`` spanning the logical ``dim``, with its axis (None: none does)."""
    return next(((j, a) for j, (d, a) in enumerate(weight.dims(companion)) if d == dim), None)


def _cut(
    weight: QuantWeight, parts: list[tuple[Companion, TensorInfo]], piece: Slice
) -> tuple[int, int, Companion, Axis] | None:
    """The first shard boundary of ``piece`` inside a factor of some stored tensor: (start, stop, ...)."""
    if piece.dim is None:
        return None
    size = weight.shape[piece.dim]
    for a, b in piece.ranges:
        for companion, _ in parts:
            found = _axis_on(weight, companion, piece.dim)
            if found is None or a >= b:
                continue
            factor = found[1].factor
            if a % factor or (b % factor and b != size):
                return a, b, companion, found[1]
    return None


def _fits(weight: QuantWeight, parts: list[tuple[Companion, TensorInfo]], piece_for: PieceFor, world: int) -> bool:
    try:
        return all(_cut(weight, parts, piece_for(world, r)) is None for r in range(world))
    except ShardingError:
        return False


def _stored_slice(weight: QuantWeight, companion: Companion, info: TensorInfo, piece: Slice) -> Slice:
    found = None if piece.dim is None else _axis_on(weight, companion, piece.dim)
    if found is None:
        return Slice(None, global_shape=info.shape)
    j, axis = found
    f = axis.factor
    ranges = tuple((a // f, -(-b // f)) if a < b else (-(-a // f),) * 2 for a, b in piece.ranges)
    global_shape = info.shape[:j] + (-(-piece.global_shape[piece.dim] // f),) + info.shape[j + 1 :]
    return Slice(j, ranges, global_shape)


def plan_quantized(
    weight: QuantWeight,
    stored: dict[str, TensorInfo],
    piece: Slice,
    *,
    dequantize: bool,
    world_size: int,
) -> tuple[list[tuple[TensorInfo, Slice, str]], Dequantize | None, dict[str, str]]:
    """Plans a rank's part of a quantized weight whose logical slice is ``piece``.

    Returns:
        Without ``dequantize``: each stored tensor with its slice and role (sliced in step with the
        weight, or replicated), and no :class:`Dequantize` (:func:`refuse_cuts` checks the slices). With
        it: no stored slices, and the windows to read and dequantize. Then notes for the report, by key.

    Raises:
        CheckpointError: a stored tensor's shape or dtype does not fit the format; a required one is
            missing when dequantizing.
    """
    scheme, parts = weight.scheme, _stored(weight, stored)
    notes: dict[str, str] = {}
    if dequantize:
        absent = [c.key for c in scheme.companions if c.required and c.key not in stored]
        if absent:
            raise CheckpointError(
                f"weight {weight.key} ({scheme.describe}) cannot be dequantized without {', '.join(absent)}",
                file=parts[0][1].file,
                key=absent[0],
                hint="The checkpoint lacks it: re-download it, or load without dtype to keep the stored form",
            )
        used = [(c, info) for c, info in parts if c.weight]
        notes[weight.key] = f"dequantized on load from {scheme.describe} ({', '.join(i.key for _, i in used)})" + (
            f"; not loaded: {', '.join(i.key for c, i in parts if not c.weight)}" if len(used) < len(parts) else ""
        )
        return [], _windows(weight, used, piece), notes
    planned = [(info, _stored_slice(weight, c, info, piece), c.role) for c, info in parts]
    if scheme.act_order and piece.dim == weight.dim(IN) and world_size > 1:
        notes[weight.primary] = (
            "act-order (desc_act): input rows sharded with their g_idx entries; scales and qzeros replicated, "
            "since any rank's rows may use any group"
        )
    return planned, None, notes


def refuse_cuts(
    weights: list[tuple[QuantWeight, PieceFor, str]],
    stored: dict[str, TensorInfo],
    world_size: int,
    candidates: list[int],
) -> None:
    """Refuses, in the stored form, a world size whose shard boundaries (of any rank) cut a packed word,
    a group or a block of any weight: the same error on every rank, naming the first such weight and
    the world sizes that fit every weight. ``weights``: each weight, its slice by (world size, rank),
    and a token that is equal for weights sliced alike (the plan rule's pattern). ``candidates``: the
    world sizes the model's head groups allow.

    Raises:
        ShardingError: naming the weight and the stored tensor whose units are cut.
    """
    for weight, piece_for, _ in weights:
        parts = _stored(weight, stored)
        for r in range(world_size):
            piece = piece_for(world_size, r)
            cut = _cut(weight, parts, piece)
            if cut is None:
                continue
            a, b, companion, axis = cut
            distinct = {}
            for other, other_piece_for, token in weights:
                other_parts = _stored(other, stored)
                signature = (other.scheme.describe, other.shape, token, tuple(c.role for c, _ in other_parts))
                distinct.setdefault(signature, (other, other_parts, other_piece_for))
            working = [w for w in candidates if all(_fits(*entry, w) for entry in distinct.values())]
            raise ShardingError(
                f"weight {weight.key} ({weight.scheme.describe}) cannot be sharded over {world_size} ranks as stored: "
                f"rank {r}'s shard [{a}, {b}) of dim {piece.dim} (size {weight.shape[piece.dim]}) cuts "
                f"{companion.key} ({axis.unit}s of {axis.factor})",
                file=parts[0][1].file,
                key=weight.key,
                hint=f"World sizes that work: {', '.join(map(str, working))}; or load with a wider dtype "
                "(dtype=torch.bfloat16) to dequantize each slice on load",
            )


def _windows(weight: QuantWeight, parts: list[tuple[Companion, TensorInfo]], piece: Slice) -> Dequantize:
    """For each range of ``piece``: the smallest window of whole words, groups and blocks around it."""
    shape = weight.shape
    if piece.dim is None:
        reads = tuple((c.role, info, Slice(None, global_shape=info.shape)) for c, info in parts)
        whole = Window(reads, (0,) * len(shape), shape, (0, 0))
        return Dequantize(weight, None, (whole,), shape)
    d, size = piece.dim, shape[piece.dim]
    step = math.lcm(1, *(found[1].factor for c, _ in parts if (found := _axis_on(weight, c, d))))
    windows = []
    for a, b in piece.ranges:
        if a >= b:
            continue
        start, stop = a - a % step, min(size, -(-b // step) * step)
        covering = Slice(d, ((start, stop),), shape)
        reads = tuple((c.role, info, _stored_slice(weight, c, info, covering)) for c, info in parts)
        origin = tuple(start if i == d else 0 for i in range(len(shape)))
        region = shape[:d] + (stop - start,) + shape[d + 1 :]
        windows.append(Window(reads, origin, region, (a - start, b - start)))
    local = shape[:d] + (sum(b - a for a, b in piece.ranges),) + shape[d + 1 :]
    return Dequantize(weight, d, tuple(windows), local)


# --- dequantizing -------------------------------------------------------------------------------------


def dequantize(plan: Dequantize, read: Callable[[TensorInfo, Slice], torch.Tensor]) -> torch.Tensor:
    """The rank's slice of the weight, float32: each window's stored slices read with ``read``,
    dequantized, and cut to the slice."""
    scheme = plan.weight.scheme
    pieces = []
    for window in plan.windows:
        stored = {role: read(info, piece) for role, info, piece in window.reads}
        values = scheme.dequantize(scheme, stored, window.origin, window.region)
        pieces.append(values if plan.dim is None else values.narrow(plan.dim, *_span(window.keep)))
    if not pieces:
        return torch.empty(plan.local_shape, dtype=torch.float32)
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, plan.dim)


def _span(keep: tuple[int, int]) -> tuple[int, int]:
    return keep[0], keep[1] - keep[0]


def unpack(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Unsigned ``bits``-bit values of int32 ``words`` along ``dim``, lowest bits first (int32)."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    values = (words.movedim(dim, -1).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return values.flatten(-2).movedim(-1, dim)


def _rows(origin: int, count: int, factor: int) -> torch.Tensor:
    """Index into a stored slice starting at ``origin // factor`` of each of ``count`` features from
    ``origin``, ``factor`` features an index."""
    return (origin + torch.arange(count)) // factor - origin // factor


def _dequantize_gptq(
    scheme: Scheme, stored: dict[str, torch.Tensor], origin: tuple[int, ...], region: tuple[int, ...]
) -> torch.Tensor:
    """``scales[g] * (q - (zeros[g] + offset))`` for each input row's group g (AutoGPTQ's order)."""
    rows, cols = region[-1], region[-2]
    mask = (1 << scheme.bits) - 1
    q = unpack(stored["qweight"], scheme.bits, -2)[..., :rows, :]
    zeros = (unpack(stored["qzeros"], scheme.bits, -1)[..., :cols] + scheme.zero_offset) & mask
    if "g_idx" in stored:
        groups = stored["g_idx"].long() - (0 if scheme.act_order else origin[-1] // scheme.group)
    else:
        groups = _rows(origin[-1], rows, scheme.group)
    values = stored["scales"].float()[..., groups, :] * (q - zeros[..., groups, :]).float()
    return values.transpose(-1, -2)


def _dequantize_awq(
    scheme: Scheme, stored: dict[str, torch.Tensor], origin: tuple[int, ...], region: tuple[int, ...]
) -> torch.Tensor:
    """``(q - zeros[g]) * scales[g]`` after undoing AWQ's interleaved packing order."""
    order = torch.tensor(AWQ_REVERSE_ORDER)

    def values(words: torch.Tensor) -> torch.Tensor:
        nibbles = unpack(words, 4, -1)
        return nibbles.unflatten(-1, (-1, 8))[..., order].flatten(-2)

    rows, cols = region[-1], region[-2]
    groups = _rows(origin[-1], rows, scheme.group)
    q = values(stored["qweight"])[..., :cols]
    zeros = values(stored["qzeros"])[..., groups, :cols]
    return ((q - zeros).float() * stored["scales"].float()[..., groups, :]).transpose(-1, -2)


def _scale(scheme: Scheme, tensor: torch.Tensor, origin: tuple[int, ...], region: tuple[int, ...]) -> torch.Tensor:
    """A scale or zero point spread over the window ``[..., out, in]`` (broadcastable)."""
    if scheme.strategy == "group":
        return tensor[..., _rows(origin[-1], region[-1], scheme.group)]
    if scheme.strategy == "block":
        rows = _rows(origin[-2], region[-2], scheme.block[0])
        return tensor[..., rows, :][..., _rows(origin[-1], region[-1], scheme.block[1])]
    if scheme.strategy == "tensor":
        return tensor.reshape(())
    return tensor  # channel: [..., out, 1]


def _dequantize_ct(
    scheme: Scheme, stored: dict[str, torch.Tensor], origin: tuple[int, ...], region: tuple[int, ...]
) -> torch.Tensor:
    """``(q - zero_point) * scale`` (compressed-tensors' order; fp8 and int8 as stored, packed values
    unpacked and offset by 2^(bits-1))."""
    offset = 1 << (scheme.bits - 1)
    if "weight_packed" in stored:
        q = unpack(stored["weight_packed"], scheme.bits, -1)[..., : region[-1]] - offset
    else:
        q = stored["weight"]
    values = q.float()
    zero = stored.get("weight_zero_point")
    if zero is not None:
        if "weight_packed" in stored and scheme.strategy in ("group", "channel"):
            zero = unpack(zero, scheme.bits, -2)[..., : region[-2], :] - offset
        values = values - _scale(scheme, zero, origin, region).float()
    return values * _scale(scheme, stored["weight_scale"], origin, region).float()


def _dequantize_mxfp4(
    scheme: Scheme, stored: dict[str, torch.Tensor], origin: tuple[int, ...], region: tuple[int, ...]
) -> torch.Tensor:
    """Each e2m1 value times 2^(scale - 127) of its block, then ``[..., in, out]`` (as transformers)."""
    blocks = stored["blocks"]
    codes = torch.stack((blocks & 0x0F, blocks >> 4), -1).flatten(-2).long()  # [..., out, blocks, 32]
    values = torch.tensor(FP4_VALUES, dtype=torch.float32)[codes]
    exponents = stored["scales"].to(torch.int32).unsqueeze(-1) - 127
    return torch.ldexp(values, exponents).flatten(-2)[..., : region[-2]].transpose(-1, -2)
