"""vLLM's weight loading at TP 2, ``load_format`` by ``load_format``, each in a fresh engine process, cold and warm.

    /work/vllm-venv/bin/python -m benchmarks.vllm_load                 # writes docs/benchmarks/vllm_load.{json,md}
    /work/vllm-venv/bin/python -m benchmarks.vllm_load --formats auto tp_loader --warm-reps 1

The checkpoint is a Llama written by transformers' ``save_pretrained`` (random normal weights, float32, several
safetensors files; generated once under ``--data``). Every measurement is one engine (``LLM(...)``) in a new
process (``python -m benchmarks.vllm_load engine ...``), with the settings vLLM's CPU build needs on this 2-core
machine. Formats alternate within each repetition.

What is measured, per worker (rank):

- ``vllm``: vLLM's own "Loading weights took X seconds", parsed from the worker's log line (vLLM's default loader
  logs it: ``auto``, ``fastsafetensors``; other loaders log nothing of the kind, shown as ``-``).
- ``window``: the same span for every format, from the worker's "Initializing model took" line (logged just before
  the loader's ``load_weights``) to the first line after loading: ``process_weights_after_loading`` and any KV-cache
  set-up excluded. Log times come with milliseconds (a logging config of ours, vLLM's format plus ``%(created)``).
- ``tp_loader``: tp_loader's own per-rank ``seconds`` from its report (``model_loader_extra_config={"report": ...}``).
- ``read_bytes`` and ``rchar`` from the worker's ``/proc/self/io``, read inside each worker through
  ``llm.collective_rpc`` once the engine is up (so start-up reads are in both; the ``dummy`` row, which reads no
  weights, is the floor to subtract). ``read_bytes`` counts what the process made the storage deliver, which is
  only meaningful cold; with two ranks on one host a page one rank faulted in is in cache for the other, so a
  rank's cold ``read_bytes`` can be below what it touched. ``rchar`` counts ``read``/``pread`` bytes and misses
  what is read through a memory map (vLLM's ``auto`` reads through safetensors' mmap).

Cold: the checkpoint's files are dropped from the page cache (``fdatasync`` then
``posix_fadvise(POSIX_FADV_DONTNEED)`` on every file) just before the engine process starts; ``fincore`` (util-
linux, ``mincore(2)``) must then report under 1% of the checkpoint resident, or the run is marked. Warm: every file
read once before the engine starts.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "benchmarks"
FORMATS = ("auto", "tp_loader", "fastsafetensors", "runai_streamer")
TP = 2

#: The checkpoint: 1.61 GB of float32 (hidden 2048, 6 layers, 32000 words), 5 safetensors files.
LLAMA = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=6,
    num_attention_heads=16,
    num_key_value_heads=4,
    vocab_size=32000,
    max_position_embeddings=256,
    initializer_range=0.02,
    tie_word_embeddings=False,
)
SHARD_SIZE = "400MB"

LOG_FORMAT = "(%(vllm_process_name)s pid=%(process)d) %(levelname)s %(created).3f [%(fileinfo)s:%(lineno)d] %(message)s"


# --- the checkpoint and the page cache -------------------------------------------------------------------------------


def make_checkpoint(data: Path) -> Path:
    """Writes the benchmark's Llama with transformers' ``save_pretrained`` once; returns its directory."""
    path = data / "llama-1.6g-fp32"
    if (path / "model.safetensors.index.json").exists():
        return path
    import torch
    import transformers

    config = transformers.LlamaConfig(**LLAMA)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path, max_shard_size=SHARD_SIZE)
    return path


def weight_files(root: Path) -> list[Path]:
    return sorted(root.glob("*.safetensors"))


def resident_bytes(paths: list[Path]) -> int:
    """Bytes of these files in the page cache, as ``mincore(2)`` reports them (util-linux ``fincore``)."""
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES", *map(str, paths)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return sum(int(line) for line in out.split())


def evict(paths: list[Path]) -> None:
    """Drops these files' pages from the page cache (written back first: dirty pages cannot be dropped)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(paths: list[Path]) -> None:
    for path in paths:
        with open(path, "rb") as handle:
            while handle.read(64 << 20):
                pass


def meminfo_cached() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("Cached:"):
                return int(line.split()[1]) * 1024
    return 0


# --- one engine, in its own process ----------------------------------------------------------------------------------


def worker_io(worker) -> dict:
    """Runs in each worker (``llm.collective_rpc``): its rank, pid and ``/proc/self/io``, page faults included."""
    import resource

    with open("/proc/self/io") as io:
        counters = {line.split(":")[0]: int(line.split()[1]) for line in io}
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "rank": int(getattr(worker, "rank", -1)),
        "pid": os.getpid(),
        "io": counters,
        "minflt": usage.ru_minflt,
        "majflt": usage.ru_majflt,
        "maxrss": usage.ru_maxrss * 1024,
    }


def engine_main(model: str, load_format: str, out: Path, report: Path | None) -> None:
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM

    extra = {"report": str(report)} if report is not None else {}
    start = time.perf_counter()
    try:
        llm = LLM(
            model=model,
            tensor_parallel_size=TP,
            load_format=load_format,
            model_loader_extra_config=extra,
            skip_tokenizer_init=True,
            enforce_eager=True,
            dtype="float32",
            max_model_len=64,
            max_num_seqs=4,
            seed=0,
        )
    except Exception as exc:  # noqa: BLE001 - the driver records why a format does not run
        out.write_text(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        sys.stdout.flush()
        os._exit(3)
    started = time.perf_counter() - start
    workers = llm.collective_rpc(worker_io)
    out.write_text(json.dumps({"start_seconds": started, "workers": workers}))
    sys.stdout.flush()
    os._exit(0)  # the engine's workers end with the process


def logging_config(path: Path) -> Path:
    """vLLM's own logging set-up with each record's time in milliseconds (``VLLM_LOGGING_CONFIG_PATH``)."""
    config = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "vllm": {"()": "vllm.logging_utils.NewLineFormatter", "format": LOG_FORMAT, "log_level": "INFO"}
        },
        "handlers": {
            "vllm": {
                "class": "logging.StreamHandler",
                "formatter": "vllm",
                "level": "INFO",
                "stream": "ext://sys.stdout",
            }
        },
        "loggers": {"vllm": {"handlers": ["vllm"], "level": "INFO", "propagate": False}},
    }
    path.write_text(json.dumps(config))
    return path


def profile_tp_loader(directory: Path) -> None:
    """In each worker (``--profile``): ``tp_loader.vllm.loader.load_into_vllm`` under cProfile (the calling thread),
    and the read stage's steps timed in its reader threads (``preadv`` calls, the page prefault, the column copies
    of row blocks), summed per step with call counts and bytes; written to ``directory/profile-<pid>.{pstats,json}``.
    Installed when vLLM's spawned worker imports this module as ``__mp_main__``; tp_loader's code is not changed."""
    import cProfile
    import functools
    import threading

    from tp_loader import read
    from tp_loader.vllm import loader

    steps: dict[str, list[float]] = {}
    lock = threading.Lock()

    def timed(name: str, fn, nbytes=None):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent = time.perf_counter() - start
                size = nbytes(*args) if nbytes is not None else 0
                with lock:
                    entry = steps.setdefault(name, [0.0, 0, 0])
                    entry[0] += spent
                    entry[1] += 1
                    entry[2] += size

        return wrapper

    source = read.PreadSource
    source._pread = timed("preadv", source._pread, lambda self, item, buffer, offset: len(buffer))
    source._read_row_blocks = timed("row blocks (preadv + column copies)", source._read_row_blocks)
    source.read_into = timed("read_into (all)", source.read_into, lambda self, item, out: item.nbytes)
    read.prefault_for_writing = timed("prefault (MADV_POPULATE_WRITE)", read.prefault_for_writing)
    original = loader.load_into_vllm

    @functools.wraps(original)
    def profiled(*args, **kwargs):
        profiler = cProfile.Profile()
        start = time.perf_counter()
        try:
            return profiler.runcall(original, *args, **kwargs)
        finally:
            total = time.perf_counter() - start
            profiler.dump_stats(directory / f"profile-{os.getpid()}.pstats")
            summary = {
                "load_into_vllm": total,
                "steps": {k: dict(zip(("seconds", "calls", "bytes"), v)) for k, v in steps.items()},
            }
            (directory / f"profile-{os.getpid()}.json").write_text(json.dumps(summary, indent=1))

    loader.load_into_vllm = profiled


if __name__ == "__mp_main__" and os.environ.get("VLLM_LOAD_PROFILE"):
    profile_tp_loader(Path(os.environ["VLLM_LOAD_PROFILE"]))


# --- the driver ------------------------------------------------------------------------------------------------------

LINE = re.compile(r"^\((?P<proc>[^ ]+) pid=(?P<pid>\d+)\) (?P<level>\w+) (?P<t>\d+\.\d+) \[[^\]]*\] (?P<msg>.*)$")
RANK = re.compile(r"TP(\d+)")


def parse_log(text: str) -> dict[int, dict]:
    """Per worker rank, seconds: vLLM's "Loading weights took" (``vllm``, rank 0 only: vLLM logs it once per
    engine), ``load`` (rank 0: from "Initializing model took" to "Loading weights took" or tp_loader's summary line,
    both logged at the end of the loader's ``load_weights``) and ``model`` (each rank: from "Starting to load model"
    to its "... GiB for KV cache" line: building the model, loading, ``process_weights_after_loading``)."""
    lines: dict[int, list[tuple[float, str]]] = {}
    for raw in text.splitlines():
        m = LINE.match(raw.strip())
        rank = RANK.search(m["proc"]) if m is not None else None
        if rank is not None:
            lines.setdefault(int(rank.group(1)), []).append((float(m["t"]), m["msg"]))
    out = {}
    for rank, records in lines.items():
        figures: dict = {"vllm": None, "load": None, "model": None}
        first = {}
        for t, msg in records:
            took = re.match(r"Loading weights took ([\d.]+) seconds", msg)
            if took:
                figures["vllm"] = float(took.group(1))
            for name, prefix in MARKS.items():
                if msg.startswith(prefix) and name not in first:
                    first[name] = t
            if re.search(r"GiB for KV cache", msg) and "kv" not in first:
                first["kv"] = t
        if "init" in first and ("took" in first or "summary" in first):
            figures["load"] = round(first.get("took", first.get("summary")) - first["init"], 3)
        if "start" in first and "kv" in first:
            figures["model"] = round(first["kv"] - first["start"], 3)
        out[rank] = figures
    return out


MARKS = {
    "start": "Starting to load model",
    "init": "Initializing model took",
    "took": "Loading weights took",
    "summary": "tp_loader: ",
}


def run_engine(model: Path, load_format: str, cache: str, work: Path, tag: str) -> dict:
    files = weight_files(model)
    total = sum(p.stat().st_size for p in files)
    if cache == "cold":
        cached_before = meminfo_cached()
        evict(files)
        resident = resident_bytes(files)
        cached_drop = cached_before - meminfo_cached()
    else:
        warm(files)
        resident = resident_bytes(files)
        cached_drop = 0
    out = work / f"{tag}.json"
    report = work / f"{tag}-report.json" if load_format == "tp_loader" else None
    log = work / f"{tag}.log"
    env = dict(os.environ, VLLM_LOGGING_CONFIG_PATH=str(logging_config(work / "logging.json")))
    command = [sys.executable, "-m", "benchmarks.vllm_load", "engine", str(model), load_format, str(out)]
    if report is not None:
        command += ["--report", str(report)]
    start = time.perf_counter()
    with open(log, "w") as handle:
        rc = subprocess.run(command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - start
    result = {
        "format": load_format,
        "cache": cache,
        "rc": rc,
        "process_seconds": round(wall, 2),
        "resident_before": resident,
        "checkpoint_bytes": total,
        "cached_dropped": cached_drop,
        "log": str(log),
    }
    data = json.loads(out.read_text()) if out.exists() else {"error": f"engine exited {rc}, no result"}
    if "error" in data:
        result["error"] = data["error"]
        result["log_tail"] = log.read_text().splitlines()[-15:]
        return result
    timings = parse_log(log.read_text())
    tpl = json.loads(report.read_text()) if report is not None and report.exists() else None
    ranks = []
    for w in sorted(data["workers"], key=lambda w: w["rank"]):
        rank = w["rank"]
        row = {"rank": rank, "pid": w["pid"], **timings.get(rank, {}), **w["io"], "majflt": w["majflt"]}
        if tpl is not None:
            mine = tpl["ranks"][rank]
            row["tp_loader_seconds"] = round(mine["seconds"], 3)
            row["tp_loader_read_seconds"] = round(mine["read_seconds"], 3)
            row["tp_loader_bytes_read"] = mine["bytes_read"]
        ranks.append(row)
    result["start_seconds"] = round(data["start_seconds"], 2)
    result["ranks"] = ranks
    if tpl is not None:
        result["tp_loader_report"] = {k: tpl[k] for k in ("checkpoint_bytes", "sharded_bytes", "replicated_bytes")}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--data", type=Path, default=Path(os.environ.get("TP_LOADER_BENCH_DIR", "/tmp/tp_loader_bench"))
    )
    parser.add_argument("--formats", nargs="+", default=list(FORMATS) + ["dummy"])
    parser.add_argument("--warm-reps", type=int, default=3)
    parser.add_argument("--cold-reps", type=int, default=1)
    parser.add_argument("--model", type=Path, help="another checkpoint instead of the generated Llama")
    parser.add_argument("--out", type=Path, default=DOCS / "vllm_load.json")
    args = parser.parse_args()
    model = args.model or make_checkpoint(args.data)
    work = args.data / "vllm_load"
    work.mkdir(parents=True, exist_ok=True)
    runs = []
    plan = [("cold", i) for i in range(args.cold_reps)] + [("warm", i) for i in range(args.warm_reps)]
    broken: set[str] = set()
    for cache, rep in plan:
        for load_format in args.formats:
            if load_format in broken or (load_format == "dummy" and (cache, rep) != ("warm", 0)):
                continue
            tag = f"{load_format}-{cache}-{rep}"
            print(f"[{time.strftime('%H:%M:%S')}] {tag} ...", flush=True)
            result = run_engine(model, load_format, cache, work, tag)
            result["rep"] = rep
            runs.append(result)
            print("   ", summary_line(result), flush=True)
            if "error" in result:
                broken.add(load_format)  # a format that does not run here is recorded once
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"model": str(model), "machine": machine(), "runs": runs}, indent=1))
    table = render(runs)
    print(table)
    args.out.with_suffix(".md").write_text(table)


def summary_line(r: dict) -> str:
    if "error" in r:
        return f"error: {r['error'][:300]}"
    cells = [
        f"rank {w['rank']}: vllm {w.get('vllm')} load {w.get('load')} model {w.get('model')} "
        f"tp_loader {w.get('tp_loader_seconds', '-')} read_bytes {w['read_bytes'] / 1e6:.0f} MB "
        f"rchar {w['rchar'] / 1e6:.0f} MB"
        for w in r["ranks"]
    ]
    return f"start {r['start_seconds']} s, resident before {r['resident_before'] / 1e6:.0f} MB; " + "; ".join(cells)


def machine() -> dict:
    import platform

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    from importlib.metadata import version

    versions = {}
    for name in ("vllm-cpu", "torch", "transformers", "safetensors", "fastsafetensors", "runai-model-streamer"):
        try:
            versions[name] = version(name)
        except Exception:  # noqa: BLE001
            versions[name] = None
    return {"cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(), "versions": versions}


def _median(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 2) if values else None


FIGURES = ("vllm", "load", "tp_loader_seconds", "model")


def render(runs: list[dict]) -> str:
    """Per format, cache and rank: the median over repetitions of each figure; then tp_loader against auto."""
    rows = [
        "| format | cache | runs | rank | vLLM 'Loading weights took' s | load s (log) | tp_loader report s "
        "| model s (log) | engine start s | read_bytes MB | rchar MB | rchar - dummy's MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["format"], r["cache"]), []).append(r)
    floor = {w["rank"]: w["rchar"] for r in runs if r["format"] == "dummy" and "ranks" in r for w in r["ranks"]}
    med: dict[tuple[str, str, int], dict[str, float | None]] = {}
    for (fmt, cache), group in groups.items():
        ok = [r for r in group if "error" not in r]
        if not ok:
            rows.append(f"| {fmt} | {cache} | {len(group)} | - | error: {group[0]['error'][:200]} |||||||| ")
            continue
        for rank in range(TP):
            per = [next(w for w in r["ranks"] if w["rank"] == rank) for r in ok]
            fig = {name: _median([w.get(name) for w in per]) for name in FIGURES}
            fig["start"] = _median([r["start_seconds"] for r in ok])
            fig["read_bytes"] = _median([w["read_bytes"] / 1e6 for w in per])
            fig["rchar"] = _median([w["rchar"] / 1e6 for w in per])
            fig["rchar_net"] = fig["rchar"] - floor[rank] / 1e6 if rank in floor else None
            med[(fmt, cache, rank)] = fig
            cells = [fig[n] for n in FIGURES] + [fig["start"]]
            rows.append(
                f"| {fmt} | {cache} | {len(ok)} | {rank} | "
                + " | ".join(_cell(c) for c in cells)
                + f" | {_cell(fig['read_bytes'], 0)} | {_cell(fig['rchar'], 0)} | {_cell(fig['rchar_net'], 0)} |"
            )
    rows.append("")
    for cache in ("cold", "warm"):
        auto = [med.get(("auto", cache, r)) for r in range(TP)]
        ours = [med.get(("tp_loader", cache, r)) for r in range(TP)]
        if not (all(auto) and all(ours)):
            continue
        own = auto[0]["vllm"], max(o["tp_loader_seconds"] for o in ours)
        load = auto[0]["load"], ours[0]["load"]
        model = max(a["model"] for a in auto), max(o["model"] for o in ours)
        rows.append(
            f"- {cache}: auto's 'Loading weights took' {own[0]} s / tp_loader's slowest rank {own[1]} s = "
            f"{_ratio(*own)}; rank 0's load (log) {load[0]} / {load[1]} s = {_ratio(*load)}; slowest rank's model "
            f"(log) {model[0]} / {model[1]} s = {_ratio(*model)}"
        )
    return "\n".join(rows) + "\n"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if not a or not b else f"{a / b:.2f}x"


def _cell(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "engine":
        engine_parser = argparse.ArgumentParser()
        engine_parser.add_argument("what")
        engine_parser.add_argument("model")
        engine_parser.add_argument("load_format")
        engine_parser.add_argument("out", type=Path)
        engine_parser.add_argument("--report", type=Path)
        a = engine_parser.parse_args()
        engine_main(a.model, a.load_format, a.out, a.report)
    else:
        main()
