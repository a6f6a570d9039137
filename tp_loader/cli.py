"""``python -m tp_loader`` / ``tp-loader``: load a checkpoint on every rank and print one report."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import torch.distributed as dist

from ._version import __version__
from .env import launch_env
from .errors import ArgumentError, TPLoaderError

logger = logging.getLogger("tp_loader")


class _Parser(argparse.ArgumentParser):
    """argparse, exiting with 1 like every other error of the command."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(1, f"{self.prog}: error: {message}\n")


class _ListPlans(argparse.Action):
    """``--list-plans``: the coverage table (plans × formats × modes, with the tests that prove each), then exit."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)  # type: ignore[arg-type]

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> NoReturn:
        from .coverage import render_text

        print(render_text(), end="", flush=True)
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tp-loader",
        description="Load a Hugging Face checkpoint into tensor-parallel shards on every rank "
        "(run under torchrun --nproc-per-node N). Without MODEL, loads a small demo checkpoint.",
    )
    add = parser.add_argument
    add("model", nargs="?", default=None, help="checkpoint directory or Hub repository id (default: the demo)")
    add("--plan", default="auto", help="built-in plan name or path to a plan file (default: auto, from config.json)")
    add("--mode", default=None, help="one of the plan's modes, e.g. ep (MoE plans: whole experts per rank)")
    add(
        "--dtype",
        default=None,
        help="convert floating-point tensors to float32 (fp32), bfloat16 (bf16) or float16 (fp16, half); "
        "an fp8 dtype keeps fp8 weights as stored (default: every tensor as stored)",
    )
    add("--device", default=None, help="cpu, cuda (cuda:LOCAL_RANK) or cuda:N (default: cuda when present, else cpu)")
    add("--report", type=Path, default=None, metavar="PATH", help="write the load report as JSON to PATH (rank 0)")
    add("--strict", action="store_true", help="fail on missing, unexpected or mismatched keys")
    add(
        "--allow-unmatched",
        action="store_true",
        help="load even when most of the checkpoint's bytes are tensors the plan does not expect (replicated)",
    )
    parser.add_argument(
        "--keep",
        action="append",
        default=None,
        metavar="NAME",
        help="load keys the plan skips (no model runs them): a skip entry's name, such as mtp (DeepSeek-V3's "
        "multi-token-prediction layer), or a key glob; repeatable",
    )
    what = parser.add_mutually_exclusive_group()
    what.add_argument(
        "--dry-run",
        type=int,
        default=None,
        metavar="WORLD_SIZE",
        help="plan every rank of WORLD_SIZE and print what each would read and hold; no process group, "
        "no tensor data read",
    )
    what.add_argument(
        "--check-forward",
        action="store_true",
        help="load into transformers' causal LM made tensor-parallel, run a few fixed tokens and compare the "
        "logits with from_pretrained on rank 0 (needs transformers; float32 unless --dtype); exit 1 on FAIL",
    )
    add(
        "--zero-copy",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="on CPU without a dtype change, shards are views of the file mapping (the default; column shards "
        "are strided views); --no-zero-copy copies them into memory of their own",
    )
    add(
        "--rebuild",
        action="store_true",
        help="MODEL is a directory save-sharded wrote: if it does not match this load, rebuild it from its source",
    )
    add(
        "--verify",
        action="store_true",
        help="MODEL is a directory save-sharded wrote: check every byte of each rank's file against its checksums",
    )
    add(
        "--tp",
        type=int,
        default=None,
        metavar="N",
        help="tensor-parallel degree, when smaller than the job: the ranks form WORLD_SIZE/N replicas of an N-way "
        "group on a (dp, tp) mesh (default: one group over every rank)",
    )
    add(
        "--share",
        choices=["none", "job"],
        default="none",
        help="job: the replicas split the reading of the checkpoint between their nodes and exchange the shards, "
        "so each byte leaves the storage once per job (CPU shards; default: none, every rank reads its own)",
    )
    add(
        "--list-plans",
        action=_ListPlans,
        help="print every built-in plan with the formats and modes a test proves for it, and exit",
    )
    add("--revision", default=None, help="Hub branch, tag or commit")
    add("--cache-dir", default=None, help="Hub cache directory")
    add("--version", action="version", version=f"%(prog)s {__version__}")
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    verbosity.add_argument("-v", "--verbose", action="store_true", help="log debug details and list every key")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command; returns the exit code (0 on success, 1 on any error).

    Every rank that fails prints its error, so that a launcher that stops the job at the first exit
    never swallows it: rank 0 the full message, other ranks one line.
    """
    rank = _rank()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == [SAVE_SHARDED]:
        return _save_sharded(argv[1:], rank)
    args = build_parser().parse_args(argv)
    _configure_logging(args, rank)
    try:
        if args.dry_run is not None:
            if rank == 0:
                _dry_run(args)
            return 0
        if args.check_forward:
            return _check_forward(args, rank)
        from .loader import load

        result = load(
            args.model,
            mode=args.mode,
            zero_copy=args.zero_copy,
            rebuild=args.rebuild,
            verify=args.verify,
            tp_size=args.tp,
            share=args.share,
            keep=args.keep,
            **_load_arguments(args),
        )
        if rank == 0 and not args.quiet:
            print(result.report.format_table(full=args.verbose), flush=True)
    except TPLoaderError as exc:
        _print_error(exc, rank)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def _configure_logging(args: argparse.Namespace, rank: int) -> None:
    """INFO on rank 0 (DEBUG with -v, errors only with -q); other ranks log errors only."""
    level = logging.ERROR if args.quiet else logging.DEBUG if getattr(args, "verbose", False) else logging.INFO
    logging.basicConfig(
        level=level if rank == 0 else max(level, logging.ERROR), format="%(levelname)s %(name)s: %(message)s"
    )


def _rank() -> int:
    """This process's rank for printing, from the launcher's variables (0 when they are unreadable)."""
    try:
        return launch_env().rank
    except TPLoaderError:
        return 0


def _print_error(exc: TPLoaderError, rank: int) -> None:
    """Rank 0 prints the whole message; any other rank one line, after a moment, so that rank 0 has
    printed before a launcher that stops the job at the first exit stops it."""
    if rank == 0:
        _write_line(f"tp_loader: error: {exc}")
        return
    line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if len(line) > MAX_LINE:
        line = line[:MAX_LINE] + "…"
    _write_line(f"tp_loader: error on rank {rank}: {type(exc).__name__}: {line}")
    time.sleep(OTHER_RANKS_DELAY_S)


def _write_line(line: str) -> None:
    """One write per line: torchrun runs workers unbuffered, and ``print`` writes the newline apart, so
    two ranks' lines could run together."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


#: How long a failing rank other than 0 waits before exiting, and how long its line may be.
OTHER_RANKS_DELAY_S = 0.5
MAX_LINE = 300


def run() -> None:
    """Entry point for ``python -m tp_loader``: exits without interpreter teardown once the process
    group is gone (gloo can abort at interpreter exit after collectives)."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _dry_run(args: argparse.Namespace) -> None:
    """``--dry-run N``: prints every rank's plan (rank 0 only) and writes its JSON to ``--report``."""
    from .arguments import check_writable, write_file
    from .dryrun import plan_load

    if args.report is not None:
        check_writable(args.report, what="report")
    summary = plan_load(
        args.model,
        world_size=args.dry_run,
        dtype=args.dtype,
        plan=args.plan,
        mode=args.mode,
        strict=args.strict,
        allow_unmatched=args.allow_unmatched,
        revision=args.revision,
        cache_dir=args.cache_dir,
        keep=args.keep,
    )
    if not args.quiet:
        print(summary.format_table(full=args.verbose), flush=True)
    if args.report is not None:
        write_file(args.report, summary.to_json(), what="report")


def _load_arguments(args: argparse.Namespace) -> dict:
    """The options a load and a forward check both take, from the command line."""
    return {
        "dtype": args.dtype,
        "device": args.device,
        "plan": args.plan,
        "strict": args.strict,
        "allow_unmatched": args.allow_unmatched,
        "report": args.report,
        "revision": args.revision,
        "cache_dir": args.cache_dir,
        "progress": not args.quiet,
    }


def _check_forward(args: argparse.Namespace, rank: int) -> int:
    """``--check-forward``: rank 0 prints the load's table and one PASS line (stdout) or FAIL line
    (stderr, also with ``-q``); every rank returns 1 on FAIL."""
    for flag, value in (
        ("--mode", args.mode),
        ("--zero-copy", args.zero_copy),
        ("--rebuild", args.rebuild or None),
        ("--verify", args.verify or None),
    ):
        if value is not None:
            raise ArgumentError(
                f"--check-forward does not take {flag}",
                key=flag.lstrip("-").replace("-", "_"),
                hint="It loads with tp_loader.parallelize and load_into: the plan's default layout, into the "
                "model's own tensors",
            )
    from .check import check_forward

    outcome = check_forward(args.model, **_load_arguments(args))
    if rank == 0 and not args.quiet:
        print(outcome.report.format_table(full=args.verbose), flush=True)
    if rank == 0 and outcome.passed and not args.quiet:
        print(outcome.format_line(), flush=True)
    if rank == 0 and not outcome.passed:
        _write_line(outcome.format_line())
    return 0 if outcome.passed else 1


#: The subcommand that writes a pre-sharded directory (``python -m tp_loader save-sharded MODEL OUT``).
SAVE_SHARDED = "save-sharded"


def build_save_sharded_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=f"tp-loader {SAVE_SHARDED}",
        description="Write every rank's shards of MODEL to OUT (one safetensors file per rank and a manifest), from "
        "which `tp-loader OUT` / tp_loader.load(OUT) restarts by reading each rank's file whole. Under torchrun each "
        "rank writes its own; in one process, --tp N plans and writes every rank in turn on the CPU.",
    )
    add = parser.add_argument
    add("model", help="checkpoint directory or Hub repository id")
    add("out", type=Path, help="the directory to write (new, empty, or one save-sharded wrote)")
    add("--tp", type=int, default=None, metavar="N", help="the world size to write for (default: torchrun's)")
    add("--plan", default="auto", help="built-in plan name or path to a plan file (default: auto, from config.json)")
    add("--mode", default=None, help="one of the plan's modes, e.g. ep (MoE plans: whole experts per rank)")
    add("--dtype", default=None, help="convert floating-point tensors to float32, bfloat16 or float16 first")
    add("--strict", action="store_true", help="fail on missing, unexpected or mismatched keys")
    add("--allow-unmatched", action="store_true", help="save tensors the plan does not expect (replicated)")
    add("--revision", default=None, help="Hub branch, tag or commit")
    add("--cache-dir", default=None, help="Hub cache directory")
    add("-q", "--quiet", action="store_true", help="print nothing but errors")
    return parser


def _save_sharded(argv: list[str], rank: int) -> int:
    """``save-sharded``: under torchrun every rank loads MODEL on the CPU and writes its file; alone, ``--tp N``
    writes all N in turn (the same files). Rank 0 prints one line per file."""
    args = build_save_sharded_parser().parse_args(argv)
    _configure_logging(args, rank)
    options = {
        "dtype": args.dtype,
        "plan": args.plan,
        "mode": args.mode,
        "strict": args.strict,
        "allow_unmatched": args.allow_unmatched,
        "revision": args.revision,
        "cache_dir": args.cache_dir,
    }
    try:
        launch = launch_env()
        if launch.launched:
            if args.tp is not None and args.tp != launch.world_size:
                raise ArgumentError(
                    f"--tp {args.tp} under a launcher of {launch.world_size} ranks",
                    key="tp",
                    hint=f"Leave --tp out, or launch {args.tp} ranks (torchrun --nproc-per-node {args.tp})",
                )
            from .loader import load

            load(args.model, save_sharded=args.out, device="cpu", progress=not args.quiet, **options)
        else:
            if args.tp is None:
                raise ArgumentError(
                    "save-sharded in one process needs the world size to write for",
                    key="tp",
                    hint="Pass --tp N (the number of tensor-parallel ranks that will load it), or run it under "
                    "torchrun --nproc-per-node N",
                )
            from .sharded_save import save_offline

            save_offline(args.model, args.out, args.tp, **options)
        if rank == 0 and not args.quiet:
            _print_saved(args.out)
    except TPLoaderError as exc:
        _print_error(exc, rank)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def _print_saved(out: Path) -> None:
    import json

    from .sharded import MANIFEST

    manifest = json.loads((out / MANIFEST).read_text())
    for entry in manifest["files"]:
        print(f"  {out / entry['name']}  {entry['size'] / 2**20:.2f} MiB", flush=True)
    print(
        f"tp_loader: wrote {len(manifest['files'])} rank files of {manifest['source']['model']} "
        f"(plan {manifest['plan']}, dtype {manifest['dtype'] or 'as stored'}) to {out}",
        flush=True,
    )
