"""vLLM's ``load_format="tp_loader"``: each rank reads only its slices, straight into vLLM's own parameters.

The stages are tp_loader's: resolve (every node's first rank fetches) → index (headers) → plan (here from vLLM's
own description of the model, :mod:`.describe` and :mod:`.layout`) → read (:func:`tp_loader.read.read_tensors`
into views of the parameters) → report. Every round is agreed over vLLM's tensor-parallel CPU group: an error on
any rank is the same error on every rank, before any byte is read where that can be known.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import env as envmod
from ..dist import Context, host_name, run_agreed
from ..errors import ArgumentError, DistributedError, PlanError, ShardingError, StrictLoadError
from ..index import Checkpoint, index_checkpoint
from ..loader import resolve_on_ranks
from ..read import ReadOptions, read_tensors
from ..resolve import find_weights
from .describe import describe_parameter, map_keys
from .layout import Fill, Target, VllmPlan, plan_fills
from .repack import process_again, restore_emptied_layers

#: vLLM model classes whose layers this loader is tested on (tests/vllm_plugin): anything else is refused, by name.
SUPPORTED = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Qwen3MoeForCausalLM",
)

#: ``model_loader_extra_config`` keys this loader takes.
EXTRA_KEYS = ("report",)


def _logger() -> Any:
    from vllm.logger import init_logger

    return init_logger("vllm.tp_loader")  # under vLLM's own handler and level


@dataclass(frozen=True)
class VllmRankReport:
    """What one rank read: bytes of tensors it holds a slice of, bytes of tensors it holds whole."""

    rank: int
    bytes_read: int
    bytes_sharded: int
    bytes_replicated: int
    num_tensors: int
    read_seconds: float
    seconds: float


@dataclass(frozen=True)
class VllmReport:
    """The agreed account of a load into a vLLM model, the same on every rank.

    Attributes:
        checkpoint_bytes: bytes of every tensor the load reads some of (each counted once, whole).
        sharded_bytes: of which, tensors split over the ranks (each rank reads about 1/TP of them).
        replicated_bytes: of which, tensors every rank reads whole (norms, a row-parallel bias, routers).
        ignored: keys the architecture ignores (vLLM's mapping drops them); ties: ``(key, parameter)`` of keys
        stored for a tied parameter (not read when the parameter's own key is stored).
    """

    model: str
    architecture: str
    world_size: int
    ranks: tuple[VllmRankReport, ...]
    checkpoint_bytes: int
    sharded_bytes: int
    replicated_bytes: int
    num_parameters: int
    ignored: tuple[str, ...] = ()
    ties: tuple[tuple[str, str], ...] = ()
    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    reload: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return max(r.seconds for r in self.ranks)

    def to_json(self) -> str:
        data = asdict(self)
        data["seconds"] = self.seconds
        return json.dumps(data, indent=2)

    def summary(self) -> str:
        per_rank = ", ".join(f"rank {r.rank} {r.bytes_read / 1e6:.2f} MB" for r in self.ranks)
        return (
            f"tp_loader: {'reloaded' if self.reload else 'loaded'} {self.num_parameters} parameters of "
            f"{self.architecture} from {self.model} at TP {self.world_size} in {self.seconds:.2f} s (slowest rank); "
            f"read {per_rank} of {self.checkpoint_bytes / 1e6:.2f} MB ({self.sharded_bytes / 1e6:.2f} MB sharded, "
            f"{self.replicated_bytes / 1e6:.2f} MB replicated)"
        )


def parse_extra(extra: dict | None) -> dict[str, Any]:
    """``model_loader_extra_config``, checked: only :data:`EXTRA_KEYS`, a misspelt key named with the nearest."""
    extra = dict(extra or {})
    for key in extra:
        if key not in EXTRA_KEYS:
            near = difflib.get_close_matches(key, EXTRA_KEYS, n=1)
            raise ArgumentError(
                f"model_loader_extra_config has an unknown key {key!r}"
                + (f" (did you mean {near[0]!r}?)" if near else ""),
                key=key,
                hint=f"load_format='tp_loader' takes {list(EXTRA_KEYS)}",
            )
    if "report" in extra and not isinstance(extra["report"], str | os.PathLike):
        raise ArgumentError(
            f"model_loader_extra_config['report'] is a {type(extra['report']).__name__}, not a path",
            key="report",
            hint="Pass the path of the JSON report to write",
        )
    return extra


def vllm_context(device: torch.device) -> Context:
    """This rank in vLLM's tensor-parallel group; the loader's rounds go over that group's CPU (gloo) group.

    Raises:
        DistributedError: pipeline parallelism (each stage holds other layers: not supported yet).
    """
    from vllm.distributed import get_pp_group, get_tp_group

    if get_pp_group().world_size > 1:
        raise DistributedError(
            f"pipeline parallelism ({get_pp_group().world_size} stages) is not supported by load_format='tp_loader'",
            hint="Use tensor parallelism only, or load_format='auto'",
        )
    tp = get_tp_group()
    timeout_s = envmod.settings(tp.world_size).timeout_s
    group = tp.cpu_group if tp.world_size > 1 else None
    return Context(
        tp.rank_in_group, tp.world_size, None, device, group=group, timeout_s=timeout_s, control_rank=tp.rank_in_group
    )


def describe_model(model: nn.Module) -> tuple[dict[str, Target], dict[str, str]]:
    """Every parameter's layout on this rank, by name, and each tied parameter's other names → its name."""
    targets: dict[str, Target] = {}
    for name, param in model.named_parameters():
        module, _, _ = name.rpartition(".")
        targets[name] = describe_parameter(name, model.get_submodule(module), param)
    canonical = {id(p): n for n, p in model.named_parameters()}
    aliases = {
        name: canonical[id(param)]
        for name, param in model.named_parameters(remove_duplicate=False)
        if canonical[id(param)] != name
    }
    return targets, aliases


def refuse_architecture(model: nn.Module) -> None:
    """Only the unquantized layers of :data:`SUPPORTED` classes are mapped: a quantized model's parameters (fp8
    weights and their block scales, packed int4) are laid out by its quant method, which this loader does not read
    yet, so they are refused rather than guessed."""
    name = type(model).__name__
    if name not in SUPPORTED:
        raise PlanError(
            f"vLLM model class {name} has no tp_loader mapping (supported: {', '.join(SUPPORTED)})",
            hint="Load this model with load_format='auto'",
        )
    quantized = sorted(
        {
            f"{type(module.quant_method).__name__} ({layer or 'the model'})"
            for layer, module in model.named_modules()
            if getattr(module, "quant_method", None) is not None
            and not type(module.quant_method).__name__.startswith("Unquantized")
        }
    )
    if quantized:
        raise PlanError(
            f"vLLM model {name} is quantized ({_shown(tuple(quantized))}): load_format='tp_loader' maps unquantized "
            "layers only",
            hint="Load this checkpoint with load_format='auto'",
        )


def _shown(items: tuple[str, ...]) -> str:
    return ", ".join(items[:5]) + (f" and {len(items) - 5} more" if len(items) > 5 else "")


def refuse_problems(vplan: VllmPlan, model: str, rank: int) -> None:
    """Any key or parameter that does not fit: one error naming them (the caller agrees it over the ranks)."""
    if vplan.mismatched:
        key, param, stored, expected = vplan.mismatched[0]
        more = f" (and {len(vplan.mismatched) - 1} more)" if len(vplan.mismatched) > 1 else ""
        raise ShardingError(
            f"checkpoint tensor is {list(stored)}, but vLLM's parameter {param} needs {list(expected)} from it{more}",
            file=model,
            key=key,
            rank=rank,
            hint="The checkpoint's config.json does not describe its tensors, or it belongs to another model",
        )
    if vplan.unmapped:
        raise StrictLoadError(
            f"{len(vplan.unmapped)} checkpoint keys map to no parameter of the vLLM model: {_shown(vplan.unmapped)}",
            file=model,
            key=vplan.unmapped[0],
            rank=rank,
            hint="The checkpoint holds tensors this model does not have (another architecture, or a format such as "
            "Mistral's consolidated.safetensors that load_format='auto' converts); load it with load_format='auto'",
        )
    if vplan.unfilled:
        raise StrictLoadError(
            f"{len(vplan.unfilled)} vLLM parameters get no checkpoint tensor: {_shown(vplan.unfilled)}",
            file=model,
            key=vplan.unfilled[0],
            rank=rank,
            hint="The checkpoint lacks these tensors (a truncated or partial checkpoint?); nothing was loaded",
        )


def _region(param: torch.Tensor, fill: Fill) -> torch.Tensor:
    """The view of ``param``'s storage that ``fill`` is read into."""
    slot = fill.slot
    data = param.data[slot.local_expert] if slot.local_expert is not None else param.data
    return data if slot.dim is None else data.narrow(slot.dim, slot.offset, slot.length)


def load_into_vllm(
    model: nn.Module,
    source: str,
    *,
    revision: str | None = None,
    cache_dir: str | None = None,
    report_path: str | os.PathLike[str] | None = None,
    reload: bool = False,
) -> VllmReport:
    """Reads each rank's slices of ``source`` into the parameters of a model vLLM built, in place.

    Args:
        model: the vLLM model on this rank (its parameters allocated, as vLLM's loaders get it).
        source: a checkpoint directory or Hub id.
        revision, cache_dir: for a Hub id.
        report_path: where rank 0 writes the agreed report's JSON.
        reload: the model has been loaded before (only the report says so).

    Returns:
        The agreed report, the same on every rank.

    Raises:
        TPLoaderError: on every rank, the lowest failing rank's error (an unsupported architecture, a parameter no
            key fills, a key no parameter takes, a shape that does not fit, a read that fails).
    """
    start = time.perf_counter()
    device = next(model.parameters()).device
    ctx = vllm_context(device)
    _, hosts = run_agreed(ctx, "hosts", host_name, lambda name: name)
    settings = envmod.settings(ctx.world_size)
    root = resolve_on_ranks(ctx, source, hosts, revision=revision, cache_dir=cache_dir, demo_dir=settings.demo_dir)

    def plan() -> tuple[Checkpoint, VllmPlan, dict[str, Target]]:
        refuse_architecture(model)
        checkpoint = index_checkpoint(find_weights(root))
        targets, aliases = describe_model(model)
        mapped = map_keys(model, list(checkpoint.tensors), set(targets) | set(aliases))
        vplan = plan_fills(checkpoint.tensors, mapped, targets, aliases)
        refuse_problems(vplan, str(root), ctx.rank)
        return checkpoint, vplan, targets

    restored = processed = 0
    if reload:  # the parameters a kernel format emptied get storage again before they are planned
        restored, _ = run_agreed(ctx, "restore", lambda: restore_emptied_layers(model, device))
    (checkpoint, vplan, targets), fingerprints = run_agreed(ctx, "plan", plan, lambda r: r[0].fingerprint())
    if len(set(fingerprints)) > 1:
        raise DistributedError(
            f"ranks see different checkpoints (config or headers) at {root}",
            rank=ctx.rank,
            hint="Make every rank see the same files (a shared filesystem or identical copies)",
        )
    params = dict(model.named_parameters())
    destinations = {fill.plan.key: _region(params[fill.target], fill) for fill in vplan.fills}
    options = ReadOptions.from_settings(settings, None, device)

    def read() -> tuple[int, int, float]:
        nonlocal processed
        with torch.no_grad():
            _, stats = read_tensors(
                checkpoint.root,
                checkpoint.format,
                tuple(f.plan for f in vplan.fills),
                options,
                checkpoint.file_sizes,
                destinations,
            )
            for target in targets.values():
                if target.zero_rows is not None:  # vocabulary padding, zero as vLLM's own loader leaves it
                    first, stop = target.zero_rows
                    params[target.name].data[first:stop].zero_()
            if reload:  # the new values into the kernels vLLM computes from
                processed = process_again(model, {fill.target for fill in vplan.fills})
        return stats.bytes_read, stats.num_tensors, stats.seconds

    _, gathered = run_agreed(
        ctx, "read", read, lambda r: (*r, vplan.bytes_sharded, vplan.bytes_replicated, time.perf_counter() - start)
    )
    report = _report(model, str(root), ctx, checkpoint, vplan, gathered, reload)
    report = dataclasses.replace(
        report, extra={"restored_layers": restored, "processed_layers": processed} if reload else {}
    )
    if report_path is not None:
        run_agreed(ctx, "write report", lambda: Path(report_path).write_text(report.to_json()) if ctx.leader else None)
    if ctx.leader:
        _logger().info("%s", report.summary())
    return report


def _report(
    model: nn.Module,
    root: str,
    ctx: Context,
    checkpoint: Checkpoint,
    vplan: VllmPlan,
    gathered: list[tuple[int, int, float, int, int, float]],
    reload: bool,
) -> VllmReport:
    ranks = tuple(
        VllmRankReport(r, read, sharded, replicated, num, read_s, seconds)
        for r, (read, num, read_s, sharded, replicated, seconds) in enumerate(gathered)
    )
    read_keys = {f.plan.key: f for f in vplan.fills}
    sharded = sum(checkpoint.tensors[k].nbytes for k, f in read_keys.items() if f.slot.dim is not None)
    replicated = sum(checkpoint.tensors[k].nbytes for k, f in read_keys.items() if f.slot.dim is None)
    return VllmReport(
        root,
        type(model).__name__,
        ctx.world_size,
        ranks,
        sharded + replicated,
        sharded,
        replicated,
        len(dict(model.named_parameters())),
        vplan.ignored,
        vplan.tied,
        reload=reload,
    )


def _loader_base() -> type:
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    return BaseModelLoader


def make_loader_class() -> type:
    """The ``BaseModelLoader`` subclass vLLM instantiates for ``load_format="tp_loader"`` (built on first use, so
    that importing this module never imports vLLM)."""
    base = _loader_base()

    class TPLoaderModelLoader(base):  # type: ignore[misc, valid-type]
        """Loads with tp_loader: each rank reads only its own slices, straight into vLLM's parameters."""

        def __init__(self, load_config: Any) -> None:
            super().__init__(load_config)
            self.extra = parse_extra(load_config.model_loader_extra_config)

        def download_model(self, model_config: Any) -> None:
            from ..resolve import resolve_source

            resolve_source(model_config.model, revision=model_config.revision, cache_dir=self.load_config.download_dir)

        def load_weights(self, model: nn.Module, model_config: Any) -> None:
            self.last_report = load_into_vllm(
                model,
                model_config.model,
                revision=model_config.revision,
                cache_dir=self.load_config.download_dir,
                report_path=self.extra.get("report"),
            )

        def get_all_weights(self, model_config: Any, model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
            """vLLM's ``reload_weights`` path: reads the checkpoint into the model's parameters in place, then
            hands vLLM nothing more to load."""
            self.last_report = load_into_vllm(
                model,
                model_config.model,
                revision=model_config.revision,
                cache_dir=self.load_config.download_dir,
                report_path=self.extra.get("report"),
                reload=True,
            )
            return iter(())

    return TPLoaderModelLoader
