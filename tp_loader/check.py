"""The forward check (``--check-forward``): a tensor-parallel model's logits against one process's.

The model is built by transformers on ``meta``, made tensor-parallel by :func:`tp_loader.parallelize`
and filled by :func:`tp_loader.load_into`; its logits for a few fixed token ids are compared on rank 0
with those of ``from_pretrained`` of the same files. transformers is imported when the check runs, never
when the package is imported: it is not a runtime dependency.
"""

from __future__ import annotations

import gc
import math
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from . import env as envmod
from .arguments import dtype_name, normalise_device, normalise_dtype
from .dist import Context, host_name, make_context, open_control_group, run_agreed
from .errors import ArgumentError, PlanError
from .into import load_into
from .loader import resolve_on_ranks
from .parallel import parallelize
from .report import LoadReport

#: The largest max abs logit difference that passes, per compute dtype, as a fraction of the reference's
#: largest logit magnitude (taken as 1 when smaller). In float32 only the order of the sums differs between
#: the sharded and the single-process forward; in 16-bit types every all-reduce of a rowwise layer rounds
#: partial sums that one process accumulates in float32. Measured on random 8-layer Llamas (logits up to 2)
#: at 2 and 4 ranks: at most 2.2e-6 in float32, 0.2% of the largest logit in float16, 1.6% in bfloat16.
TOLERANCES = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}

#: How many token ids the check runs, and how they are spread over the vocabulary.
NUM_TOKENS = 8
TOKEN_STRIDE = 37


@dataclass(frozen=True)
class ForwardCheck:
    """The outcome of :func:`check_forward`, the same on every rank.

    Attributes:
        model: the checkpoint directory.
        world_size: the number of tensor-parallel ranks (1: loaded unsharded in one process).
        dtype: the dtype both models ran in.
        num_tokens: how many token ids were run.
        max_abs_diff: the largest absolute difference between the two models' logits (``inf`` when
            their shapes differ, ``nan`` when either has a NaN).
        tolerance: the largest difference that passes (:data:`TOLERANCES` times the logit scale).
        report: the report of the sharded load.
    """

    model: str
    world_size: int
    dtype: str
    num_tokens: int
    max_abs_diff: float
    tolerance: float
    report: LoadReport

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance  # False for nan

    def format_line(self) -> str:
        """One line: the verdict, the difference and the tolerance."""
        verdict, compared = ("PASS", "<=") if self.passed else ("FAIL", ">")
        ranks = f"{self.world_size} ranks" if self.world_size > 1 else "one unsharded process"
        return (
            f"tp_loader forward check {verdict}: max abs logit difference {self.max_abs_diff:.2e} {compared} "
            f"{self.tolerance:.1e} ({self.dtype}, {self.num_tokens} tokens, {ranks} vs from_pretrained on rank 0)"
        )


def check_forward(
    model: str | os.PathLike[str] | None = None,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    plan: str | os.PathLike[str] = "auto",
    strict: bool = False,
    allow_unmatched: bool = False,
    report: str | os.PathLike[str] | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> ForwardCheck:
    """Loads ``model`` tensor-parallel into a transformers causal LM and compares its logits for a few
    fixed token ids with those of ``from_pretrained`` of the same files on rank 0.

    Call it on every rank, as :func:`tp_loader.load`. In one process without a process group the model
    is loaded unsharded (no ``parallelize``). Rank 0 holds the whole reference model for a moment
    (after the sharded model is freed), so it needs the memory of the whole model in ``dtype``.

    Args:
        model: a checkpoint directory or a Hub repository id; ``None``: the demo checkpoint.
        dtype: what both models run in: ``float32`` (the default, whatever the checkpoint stores),
            ``bfloat16`` or ``float16``.
        device, plan, allow_unmatched, report, revision, cache_dir, progress: as for :func:`tp_loader.load`.
        strict: refuse, before reading, unless the model's tensors and the checkpoint's keys match
            exactly (as :func:`tp_loader.load_into`); without it, checkpoint keys the model lacks are
            skipped, and model tensors the checkpoint lacks are still an error.

    Returns:
        The :class:`ForwardCheck`, the same on every rank; ``passed`` says whether it passed.

    Raises:
        ArgumentError: transformers is not installed, the dtype is not one the check runs in, or the
            checkpoint is not of a causal LM transformers knows.
        PlanError: a module keeps a buffer on meta that the config cannot rebuild, or the sharded
            forward fails.
        TPLoaderError: as :func:`tp_loader.load_into`.
    """
    transformers = _import_transformers()
    if not progress:
        transformers.utils.logging.disable_progress_bar()
    wanted = _compute_dtype(dtype)
    launch = envmod.launch_env()
    settings = envmod.settings(launch.local_world_size)
    ctx = open_control_group(make_context(None, normalise_device(device, launch.local_rank), launch, settings))
    _, hosts = run_agreed(ctx, "hosts", host_name, lambda host: host)
    root = resolve_on_ranks(ctx, model, hosts, revision=revision, cache_dir=cache_dir, demo_dir=settings.demo_dir)

    loaded, input_ids, logits = _sharded_logits(
        transformers,
        root,
        wanted,
        ctx,
        plan=plan,
        strict=strict,
        allow_unmatched=allow_unmatched,
        report=report,
        progress=progress,
    )
    gc.collect()  # the sharded model is gone before rank 0 builds the whole one

    def compare() -> tuple[float, float] | None:
        if ctx.rank != 0:
            return None
        reference = transformers.AutoModelForCausalLM.from_pretrained(root, dtype=wanted).to(ctx.device).eval()
        return _difference(logits, _forward(reference, input_ids))

    _, outcomes = run_agreed(ctx, "reference", compare, lambda outcome: outcome)
    max_abs_diff, scale = outcomes[0]
    return ForwardCheck(
        str(root),
        ctx.world_size,
        dtype_name(wanted),
        input_ids.shape[1],
        max_abs_diff,
        TOLERANCES[wanted] * scale,
        loaded,
    )


def _sharded_logits(
    transformers: Any,
    root: os.PathLike[str],
    dtype: torch.dtype,
    ctx: Context,
    *,
    plan: str | os.PathLike[str],
    strict: bool,
    **load_options: Any,
) -> tuple[LoadReport, torch.Tensor, torch.Tensor]:
    """Builds, parallelizes and loads the model; returns the load's report, the input and the logits."""
    (config, model), _ = run_agreed(ctx, "build", lambda: _build(transformers, root, dtype, ctx, plan))
    report = load_into(model, root, plan=plan, mesh=ctx.mesh, device=ctx.device, strict=strict, **load_options)
    if report.missing_keys:
        missing = report.missing_keys
        raise ArgumentError(
            f"the checkpoint has no tensor for {len(missing)} of the model's tensors "
            f"({', '.join(missing[:5])}{' …' if len(missing) > 5 else ''})",
            file=str(root),
            hint="Check that config.json describes these weights",
        )
    run_agreed(ctx, "buffers", lambda: rebuild_meta_buffers(model, config, ctx.device))
    input_ids = token_ids(config.vocab_size, ctx.device)
    logits, _ = run_agreed(ctx, "forward", lambda: _forward(model, input_ids))
    return report, input_ids, logits


def token_ids(vocab_size: int, device: torch.device) -> torch.Tensor:
    """The check's input: :data:`NUM_TOKENS` fixed ids spread over the vocabulary, batch of one."""
    return torch.tensor([[(1 + TOKEN_STRIDE * i) % vocab_size for i in range(NUM_TOKENS)]], device=device)


def rebuild_meta_buffers(model: nn.Module, config: Any, device: torch.device) -> list[str]:
    """Re-creates every submodule that still holds a buffer on ``meta`` as ``type(module)(config=config)``
    on ``device``: non-persistent buffers (the rotary ``inv_freq``) are in no checkpoint, so
    :func:`tp_loader.load_into` leaves them on meta.

    Args:
        model: the loaded model.
        config: the config the model was built from.
        device: where the rebuilt modules go.

    Returns:
        The paths of the rebuilt modules.

    Raises:
        PlanError: a module with a meta buffer also holds loaded tensors (rebuilding it would lose them),
            cannot be built from ``config=config`` alone, or still has a meta buffer when rebuilt.
    """
    rebuilt: dict[int, nn.Module] = {}
    paths = []
    for path, module in list(model.named_modules(remove_duplicate=False)):
        if id(module) not in rebuilt:
            on_meta = [name for name, buffer in module.named_buffers(recurse=False) if buffer.is_meta]
            if not on_meta:
                continue
            rebuilt[id(module)] = _rebuilt(path, module, on_meta, config).to(device)
        parent, _, leaf = path.rpartition(".")
        model.get_submodule(parent).register_module(leaf, rebuilt[id(module)])
        paths.append(path)
    left = [name for name, buffer in model.named_buffers() if buffer.is_meta]
    if left:  # a module below a rebuilt one, reached through a path that was replaced
        raise PlanError(
            f"buffers still on meta after rebuilding {', '.join(paths)}: {', '.join(left[:5])}",
            hint="Re-create these buffers after load_into",
        )
    return paths


def _rebuilt(path: str, module: nn.Module, on_meta: list[str], config: Any) -> nn.Module:
    cls = type(module).__name__
    what = (
        f"module {path or '(the model itself)'!r} ({cls}) has buffers on meta that no checkpoint holds "
        f"({', '.join(on_meta)})"
    )
    hint = "Re-create this module's buffers yourself after load_into (see docs/serving.md)"
    held = list(module.state_dict())
    if not path or held:
        reason = "it is the model itself" if not path else f"it also holds loaded tensors ({', '.join(held[:3])})"
        raise PlanError(f"{what}, and cannot be rebuilt from the config: {reason}", hint=hint)
    try:
        new = type(module)(config=config)
    except Exception as exc:  # noqa: BLE001 - any constructor failure means the same: it cannot be rebuilt
        raise PlanError(
            f"{what}, and {cls}(config=config) cannot rebuild it: {type(exc).__name__}: {exc}", hint=hint
        ) from None
    if any(buffer.is_meta for buffer in new.buffers()):
        raise PlanError(f"{what}, and {cls}(config=config) makes them on meta again", hint=hint)
    return new


def _import_transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ArgumentError(
            "the forward check builds the model with transformers, which is not installed",
            key="check_forward",
            hint="Install it (pip install transformers) or leave out --check-forward",
        ) from None
    return transformers


def _compute_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    wanted = normalise_dtype(dtype) or torch.float32
    if wanted not in TOLERANCES:
        raise ArgumentError(
            f"the forward check runs in float32, bfloat16 or float16, not {dtype_name(wanted)}",
            key="dtype",
            hint="Pass --dtype float32 (the default), bfloat16 or float16",
        )
    return wanted


def _build(transformers: Any, root: os.PathLike[str], dtype: torch.dtype, ctx: Context, plan: Any) -> tuple:
    """The config and the causal LM built on meta, parallelized when there is a mesh."""
    try:
        config = transformers.AutoConfig.from_pretrained(root)
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    except ValueError as exc:
        raise ArgumentError(
            f"transformers builds no causal LM from this config.json: {str(exc).splitlines()[0]}",
            file=str(root),
            hint="The forward check runs models of transformers' AutoModelForCausalLM",
        ) from None
    model.eval()
    if ctx.mesh is not None:
        parallelize(model, mesh=ctx.mesh, plan=plan, config=config)
    return config, model


def _forward(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The logits for ``input_ids``, whole and in float32 on the CPU."""
    try:
        with torch.no_grad():
            logits = model(input_ids, use_cache=False).logits
    except Exception as exc:  # noqa: BLE001 - a sharded layout the model's code does not expect
        raise PlanError(
            f"the forward of {type(model).__name__} failed: {type(exc).__name__}: {str(exc).splitlines()[0]}",
            hint="The model's code may need per-rank head counts or sizes; see docs/serving.md",
        ) from None
    if isinstance(logits, DTensor):
        logits = logits.full_tensor()
    return logits.float().cpu()


def _difference(logits: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """The max abs difference (``inf`` for different shapes) and the logit scale, at least 1."""
    scale = max(1.0, reference.abs().max().item()) if reference.numel() else 1.0
    if logits.shape != reference.shape:
        return math.inf, scale
    return (logits - reference).abs().max().item(), scale
