"""``python -m tp_loader`` / ``tp-loader``: load a checkpoint on every rank and print one report."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch.distributed as dist

from .env import launch_env
from .errors import TPLoaderError

logger = logging.getLogger("tp_loader")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tp-loader",
        description="Load a Hugging Face checkpoint into tensor-parallel shards on every rank "
        "(run under torchrun --nproc-per-node N). Without MODEL, loads a small demo checkpoint.",
    )
    parser.add_argument(
        "model",
        nargs="?",
        default=None,
        help="checkpoint directory or Hub repository id (default: the demo checkpoint)",
    )
    parser.add_argument(
        "--plan", default="auto", help="built-in plan name or path to a plan file (default: auto, from config.json)"
    )
    parser.add_argument(
        "--mode", default=None, help="one of the plan's modes, e.g. ep (MoE plans: whole experts per rank)"
    )
    parser.add_argument(
        "--dtype", default=None, help="convert floating-point tensors to this dtype, e.g. bfloat16 (default: as stored)"
    )
    parser.add_argument(
        "--device", default=None, help="device for the shards (default: cuda:LOCAL_RANK when CUDA is present, else cpu)"
    )
    parser.add_argument(
        "--report", type=Path, default=None, metavar="PATH", help="write the load report as JSON to PATH (rank 0)"
    )
    parser.add_argument("--strict", action="store_true", help="fail on missing, unexpected or mismatched keys")
    parser.add_argument(
        "--dry-run",
        type=int,
        default=None,
        metavar="WORLD_SIZE",
        help="plan every rank of WORLD_SIZE and print what each would read; no process group, no tensor data read",
    )
    parser.add_argument(
        "--zero-copy",
        action="store_true",
        default=None,
        help="on CPU, keep contiguous shards as views of the file mapping instead of copying them",
    )
    parser.add_argument("--revision", default=None, help="Hub branch, tag or commit")
    parser.add_argument("--cache-dir", default=None, help="Hub cache directory")
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    verbosity.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command; returns the exit code (0 on success)."""
    args = build_parser().parse_args(argv)
    rank = launch_env().rank
    level = logging.ERROR if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(
        level=level if rank == 0 else max(level, logging.ERROR), format="%(levelname)s %(name)s: %(message)s"
    )
    from .loader import load

    code = 0
    if args.dry_run is not None:
        return _dry_run(args)
    try:
        result = load(
            args.model,
            dtype=args.dtype,
            device=args.device,
            plan=args.plan,
            mode=args.mode,
            strict=args.strict,
            revision=args.revision,
            cache_dir=args.cache_dir,
            progress=not args.quiet,
            zero_copy=args.zero_copy,
        )
        if rank == 0:
            if not args.quiet:
                print(result.report.format_table(), flush=True)
            if args.report is not None:
                args.report.parent.mkdir(parents=True, exist_ok=True)
                args.report.write_text(result.report.to_json())
    except TPLoaderError as exc:
        if rank == 0 or exc.rank == rank:
            print(f"tp_loader: error: {exc}", file=sys.stderr, flush=True)
        code = 1
    if dist.is_initialized():
        dist.destroy_process_group()
    return code


def run() -> None:
    """Entry point for ``python -m tp_loader``: exits without interpreter teardown once the process
    group is gone (gloo can abort at interpreter exit after collectives)."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _dry_run(args: argparse.Namespace) -> int:
    """Indexes the headers and plans every rank of ``--dry-run N`` in this one process."""
    from .demo import ensure_demo
    from .env import settings
    from .index import index_checkpoint
    from .loader import normalise_dtype, wants_dequantize
    from .plan import make_plan
    from .report import format_plans
    from .resolve import find_weights, resolve_source
    from .spec import select_spec

    try:
        if args.dry_run < 1:
            raise TPLoaderError(
                f"--dry-run needs a world size of at least 1, got {args.dry_run}",
                hint="Pass the number of tensor-parallel ranks",
            )
        root = (
            ensure_demo(settings(1).demo_dir)
            if args.model is None
            else resolve_source(args.model, revision=args.revision, cache_dir=args.cache_dir)
        )
        checkpoint = index_checkpoint(find_weights(root))
        spec = select_spec(args.plan, checkpoint.config, model=str(root), mode=args.mode)
        dequantize = wants_dequantize(normalise_dtype(args.dtype))
        print(
            format_plans(
                [
                    make_plan(checkpoint, spec, args.dry_run, rank, model=str(root), dequantize=dequantize)
                    for rank in range(args.dry_run)
                ]
            )
        )
    except TPLoaderError as exc:
        print(f"tp_loader: error: {exc}", file=sys.stderr)
        return 1
    return 0
