"""Time to a ready model: a transformers ``LlamaForCausalLM`` checkpoint (``save_pretrained``, fp32) made into a
tensor-parallel model that can run a forward, by tp_loader's two ways and by transformers, in fresh ranks; and an
in-place reload of a second checkpoint into a model already loaded.

    python -m benchmarks.ready                          # TP 1 and 2: 5 warm runs each, 3 cold at TP 2 (0.53 GB)
    python -m benchmarks.ready --model 1b               # the same on TinyLlama-1.1B's shape (4.4 GB)
    python -m benchmarks.ready --reps 1 --cold-reps 0   # a quick look
    python -m benchmarks.ready --reps 1 --cold-reps 0 --systems load_into "load() alone" --profile /tmp/ready-prof
        # and one more warm run of each system and degree under cProfile per rank, not counted in the figures

Each measurement forks fresh gloo ranks. Not timed: imports (in the parent before the fork; ``torch._dynamo`` in
the rank), the process group and the 1-D mesh; for a reload, the first load (with every page of it read, as a
served model's are). Timed on each rank: from before the config is read (a reload: from its ``load_into`` call)
until the model (or the shards) is ready and every 4 KiB page of every local tensor has been read
(``systems.touch``); the figure is the slowest rank. Peak RSS: the rank's ``VmHWM``, reset just before the clock
starts. Warm runs read every file first; cold runs drop the pages of the checkpoint read on the clock
(``POSIX_FADV_DONTNEED``).
The first run of each row and every cold run check the result against the single-process transformers model of
the checkpoint read (logits within 1e-4; for ``load()`` alone, every tensor) and fail loudly; a reload also fails
if any tensor's storage moved.
"""

from __future__ import annotations

import argparse
import cProfile
import importlib.resources
import io
import json
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import transformers
import transformers.integrations.tensor_parallel  # noqa: F401 - import cost is not load cost
import transformers.models.llama.modeling_llama  # noqa: F401
from safetensors.torch import load_file
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from transformers.initialization import no_init_weights

import tp_loader
from benchmarks.measure import add_data_argument, evict, io_counters, machine, status_bytes, versions, warm
from benchmarks.systems import local, touch
from tp_loader.testing import run_ranks, values

#: The checkpoints (``--model``), all fp32 Llamas with GQA and an untied LM head. ``small``: 0.53 GB, hidden 1024,
#: 6 layers, 16/4 heads. ``1b``: TinyLlama-1.1B's shape (hidden 2048, 22 layers, 32/4 heads), 4.40 GB: how
#: the fixed costs (building the model, the collective rounds) weigh at a size that is served.
COMMON = dict(vocab_size=32000, max_position_embeddings=256, tie_word_embeddings=False)
CONFIGS = {
    "small": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=6, num_attention_heads=16)
    | dict(num_key_value_heads=4, **COMMON),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32)
    | dict(num_key_value_heads=4, **COMMON),
}
PROMPT = torch.tensor([[1, 306, 4966, 393, 278, 1900, 29871, 8310, 17, 3]])
ATOL = 1e-4
GOALS = [("load_into", "load() alone", "≤ 1.2×", lambda x: x <= 1.2)]  # numerator, denominator, goal (issue 24.5)
GOALS += [("transformers", "load_into", "≥ 3×", lambda x: x >= 3)]


#: Seconds of each step of the last ``_load_into`` in this process (the rows show where the time goes).
PHASES: dict[str, float] = {}
#: Those steps, in order: the config read, the model built on meta, ``parallelize``, the ``load_into`` call, and the
#: rotary embedding's buffer computed again.
STEPS = ("config_s", "model_s", "parallelize_s", "load_into_s", "buffers_s")


def _load_into(root: Path, mesh: DeviceMesh, **options: object) -> tuple[torch.nn.Module, dict]:
    times = [time.perf_counter()]
    config = transformers.AutoConfig.from_pretrained(root)
    times.append(time.perf_counter())
    with torch.device("meta"), no_init_weights():  # as from_pretrained: no random init of weights to be loaded
        model = transformers.AutoModelForCausalLM.from_config(config)
    times.append(time.perf_counter())
    tp_loader.parallelize(model, mesh=mesh)
    times.append(time.perf_counter())
    tp_loader.load_into(model, root, mesh=mesh, progress=False, **options)
    times.append(time.perf_counter())
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    times.append(time.perf_counter())
    PHASES.update(zip(STEPS, (b - a for a, b in zip(times, times[1:]))))
    return model.eval(), _tensors(model)


def _tensors(model: torch.nn.Module) -> dict:
    """The model's tensors for the page walk: ``state_dict(keep_vars=True)``. A plain ``state_dict()`` detaches
    each tensor, and a DTensor's first ``detach`` of each layout runs DTensor's sharding propagation: 10 ms on
    the 0.53 GB model at TP 1 (six layouts) that no forward or serving step needs, as ``load()`` alone pays none."""
    return model.state_dict(keep_vars=True)


def _load_assign(root: Path, mesh: DeviceMesh) -> tuple[torch.nn.Module, dict]:
    """docs/serving.md's steps 2-4: ``load()``, torch's styles on a meta model, ``load_state_dict(assign=True)``."""
    result = tp_loader.load(root, mesh=mesh, progress=False)
    config = transformers.AutoConfig.from_pretrained(root)
    with torch.device("meta"), no_init_weights():  # as from_pretrained: no random init of weights to be loaded
        model = transformers.AutoModelForCausalLM.from_config(config)
    plan = {"model.embed_tokens": RowwiseParallel(input_layouts=Replicate())}  # vocab: Shard(0)
    plan["lm_head"] = ColwiseParallel(output_layouts=Replicate())  # vocab: Shard(0), logits gathered
    for i in range(config.num_hidden_layers):
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            plan[f"model.layers.{i}.{name}"] = ColwiseParallel()
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            plan[f"model.layers.{i}.{name}"] = RowwiseParallel()
    parallelize_module(model, mesh, plan)
    current = model.state_dict(keep_vars=True)
    state = {k: v if isinstance(current[k], DTensor) else v.to_local() for k, v in result.state_dict.items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    return model.eval(), _tensors(model)


def _transformers(root: Path, mesh: DeviceMesh) -> tuple[torch.nn.Module, dict]:
    """``tp_plan="auto"``, in its non-deprecated spelling; tp_size comes from WORLD_SIZE (1: a plain load)."""
    tp = transformers.DistributedConfig(tp_plan="auto")
    model = transformers.AutoModelForCausalLM.from_pretrained(root, distributed_config=tp, dtype=torch.float32)
    return model.eval(), _tensors(model)


def second(root: Path) -> Path:
    """The checkpoint an in-place reload reads: the same architecture, other weights (another seed)."""
    return root.with_name(root.name + "-b")


#: A model loaded off the clock by ``BEFORE``, which a reload system then rewrites in place on the clock.
_LOADED: list[torch.nn.Module] = []


def _first_load(root: Path, mesh: DeviceMesh, zero_copy: bool) -> None:
    """The model a server has been serving: loaded, and every page of it read (in memory, as weights in use are)."""
    model, state = _load_into(root, mesh, zero_copy=zero_copy)
    with torch.no_grad():  # the walk reads parameters that require grad: no autograd graph
        touch(state)
    _LOADED[:] = [model]


def _reload(root: Path, mesh: DeviceMesh) -> tuple[torch.nn.Module, dict]:
    """``load_into`` of the second checkpoint into the loaded model: every tensor's storage must stay where it is."""
    model = _LOADED.pop()
    pointers = {name: local(t).data_ptr() for name, t in _tensors(model).items()}
    tp_loader.load_into(model, second(root), mesh=mesh, progress=False)
    state = _tensors(model)
    moved = [name for name, pointer in pointers.items() if local(state[name]).data_ptr() != pointer]
    assert not moved, f"the reload moved {moved[:3]}"
    return model.eval(), state


SYSTEMS = {
    "load_into": _load_into,
    "load() + load_state_dict(assign)": _load_assign,
    "load() alone": lambda root, mesh: (None, tp_loader.load(root, mesh=mesh, progress=False).state_dict),
    "transformers": _transformers,
    "reload in place": _reload,
    "reload in place, copies": _reload,
}
#: Off the clock, before a system: the first load that a reload rewrites (zero-copy views of the first checkpoint's
#: mapping, whose pages a reload's writes copy; or shards in memory of their own, ``zero_copy=False``).
BEFORE = {
    "reload in place": lambda root, mesh: _first_load(root, mesh, zero_copy=True),
    "reload in place, copies": lambda root, mesh: _first_load(root, mesh, zero_copy=False),
}


def _check(model: torch.nn.Module | None, state: dict, root: Path, reference: torch.Tensor) -> float:
    """The largest error against the single-process model: logits, or for shards alone every tensor."""
    if model is None:
        want = {k: v for f in sorted(root.glob("*.safetensors")) for k, v in load_file(f).items()}
        assert sorted(state) == sorted(want), f"keys differ: {sorted(set(state) ^ set(want))[:5]}"
        return max((state[k].full_tensor() - v).abs().max().item() for k, v in want.items())
    with torch.no_grad():
        return (model(PROMPT).logits - reference).abs().max().item()


def _measure(rank: int, world_size: int, system: str, root: Path, references: dict, check: bool) -> dict:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    importlib.import_module("torch._dynamo")  # a fresh process's first DTensor imports it: not load cost
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))  # as torchrun sets them
    mesh = init_device_mesh("cpu", (world_size,))
    if system in BEFORE:
        BEFORE[system](root, mesh)
        PHASES.clear()
    Path("/proc/self/clear_refs").write_text("5")  # the peak from here: not a reload's first load, done above
    dist.barrier()
    modules, rss_start, read_start = set(sys.modules), status_bytes("VmRSS"), io_counters()["read_bytes"]
    start, cpu_start = time.perf_counter(), time.process_time()
    model, state = SYSTEMS[system](root, mesh)
    built = time.perf_counter() - start
    with torch.no_grad():  # the walk reads parameters that require grad: no autograd graph
        touch(state)
    out = {"seconds": time.perf_counter() - start, "cpu_s": time.process_time() - cpu_start, "built_s": built}
    if system == "load_into":  # its steps, and its time without transformers' part (config, model on meta)
        out |= PHASES | {"tp_loader_s": out["seconds"] - PHASES["config_s"] - PHASES["model_s"]}
    out["rss_start"], out["peak_rss"] = rss_start, status_bytes("VmHWM")
    out["storage_read"] = io_counters()["read_bytes"] - read_start
    out["imported_on_clock"] = sorted(set(sys.modules) - modules)
    q = state["model.layers.0.self_attn.q_proj.weight"]  # tp_size from WORLD_SIZE: unset, transformers loads whole
    assert world_size == 1 or isinstance(q, DTensor) and q.to_local().shape[0] < q.shape[0], f"{system}: not sharded"
    if check:
        reference = references[second(root) if system in BEFORE else root]
        out["max_abs_error"] = error = _check(model, state, root, reference)
        if not error <= ATOL:
            raise AssertionError(f"{system} at TP{world_size}: rank {rank} differs by {error} (> {ATOL})")
    return out


def _profile(rank: int, world_size: int, system: str, root: Path, out: Path) -> None:
    """One warm run of ``system`` as ``_measure`` runs it (no check) under cProfile: ``out`` gets this rank's
    ``.prof`` and its 40 costliest calls by cumulative and by own time as text."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    importlib.import_module("torch._dynamo")
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    mesh = init_device_mesh("cpu", (world_size,))
    if system in BEFORE:
        BEFORE[system](root, mesh)
    dist.barrier()
    profile = cProfile.Profile()
    profile.enable()
    _, state = SYSTEMS[system](root, mesh)
    with torch.no_grad():
        touch(state)
    profile.disable()
    name = out / f"{system.replace(' ', '_').replace('()', '').replace(',', '')}-tp{world_size}-rank{rank}"
    profile.dump_stats(name.with_suffix(".prof"))
    text = io.StringIO()
    for order in ("cumulative", "tottime"):
        pstats.Stats(profile, stream=text).sort_stats(order).print_stats(40)
    name.with_suffix(".txt").write_text(text.getvalue())


def _prepare(rank: int, world_size: int, root: Path, config: dict, seed: int) -> None:
    """Writes the checkpoint and the single-process model's logits on PROMPT, in a process of its own: built
    here, the model would leave the parent's heap, which every rank inherits, large."""
    made = {"config": config, "seed": seed}
    if (root / "reference.pt").is_file() and made.items() <= torch.load(root / "reference.pt").items():
        return
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).save_pretrained(root)
    model = transformers.AutoModelForCausalLM.from_pretrained(root, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.save(made | {"logits": model(PROMPT).logits}, root / "reference.pt")


def _summary(runs: list[dict]) -> dict:
    """Medians over the runs: the slowest rank's time (with min and max), the busier rank's CPU time; the largest
    memory and storage figures over ranks and runs."""
    times, most = [r["seconds"] for r in runs], lambda key: max(max(r[key]) for r in runs) / 1e6
    out = {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}
    out |= {"built_median_s": statistics.median(r["built_s"] for r in runs), "peak_rss_mb": most("peak_rss")}
    out["cpu_median_s"] = statistics.median(max(r["cpu_s"]) for r in runs)
    out |= {"rss_start_mb": most("rss_start"), "storage_read_mb": most("storage_read")}
    out["max_abs_error"] = max((e for r in runs for e in r.get("max_abs_error", [])), default=None)
    for phase in (*STEPS, "tp_loader_s"):  # load_into's steps: the slowest rank's, median
        if phase in runs[0]:
            out[phase] = statistics.median(max(r[phase]) for r in runs)
    return out | {"runs": runs}


def _goals(rows: list[dict]) -> list[dict]:
    """The two ratios of warm medians at each degree, each against its goal; and, for the first, the same
    ratio without transformers' part (the config read and ``from_config`` on meta, which ``load()`` alone does
    not do: what tp_loader's ``parallelize``, ``load_into`` and the page walk take), and without the model's
    construction at all (also ``parallelize``): how the ``load_into`` call itself compares with ``load()``."""
    warm_rows = {(r["tp"], r["system"]): r for r in rows if r["cache"] == "warm"}
    median = {key: r["median_s"] for key, r in warm_rows.items()}
    out = []
    for tp in sorted({tp for tp, _ in median}):
        for top, bottom, goal, ok in GOALS:
            if (tp, top) in median and (tp, bottom) in median:
                x = median[tp, top] / median[tp, bottom]
                out.append({"tp": tp, "name": f"{top} / {bottom}", "ratio": x, "goal": goal, "pass": ok(x)})
        into, alone = warm_rows.get((tp, "load_into")), warm_rows.get((tp, "load() alone"))
        if into and alone and "tp_loader_s" in into:
            x = into["tp_loader_s"] / alone["median_s"]
            name = "load_into without the config and from_config (parallelize, load_into, buffers, walk) / load() alone"
            out.append({"tp": tp, "name": name, "ratio": x, "goal": "≤ 1.2×", "pass": x <= 1.2})
        if into and alone and "load_into_s" in into:
            walk = into["median_s"] - into["built_median_s"]  # the page walk after the model is ready
            x = (into["load_into_s"] + walk) / alone["median_s"]
            name = "load_into call + page walk / load() alone (model construction left out)"
            out.append({"tp": tp, "name": name, "ratio": x, "goal": "≤ 1.1×", "pass": x <= 1.1})
    return out


def markdown(result: dict) -> str:
    m, v = result["machine"], result["versions"]
    lines = [
        "# Time to a ready model (`python -m benchmarks.ready`)\n",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, Python {m['python']}; tp_loader "
        f"{v['tp_loader']}, torch {v['torch']}, transformers {v['transformers']}; gloo on CPU. Checkpoint: "
        f"LlamaForCausalLM `save_pretrained` (`--model {result.get('model', 'small')}`), fp32, "
        f"{result['checkpoint_gb']:.2f} GB in {result['num_files']} file(s). Run {result['started']}; load average "
        f"(1 min) {result['load_average']['before'][0]:.1f} before, "
        f"{result['load_average']['after'][0]:.1f} after. Slowest rank, median (min–max) over the runs.",
        "",
        "| TP | cache | system | ready s | before page walk s | CPU s | peak RSS MB per rank | RSS at start MB "
        "| storage read MB per rank | max abs error | runs |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        error = "—" if r["max_abs_error"] is None else f"{r['max_abs_error']:.1e}"
        lines.append(
            f"| {r['tp']} | {r['cache']} | {r['system']} | {r['median_s']:.3f} ({r['min_s']:.3f}–{r['max_s']:.3f}) "
            f"| {r['built_median_s']:.3f} | {r['cpu_median_s']:.3f} | {r['peak_rss_mb']:.0f} | {r['rss_start_mb']:.0f} "
            f"| {r['storage_read_mb']:.0f} | {error} | {len(r['runs'])} |"
        )
    steps = [r for r in result["rows"] if "load_into_s" in r]
    if steps:
        lines += ["", "Where `load_into`'s time goes (slowest rank, medians):", ""]
        lines += ["| TP | cache | config s | model on meta s | parallelize s | load_into s | rotary buffer s |"]
        lines += ["|---|---|---:|---:|---:|---:|---:|"]
        lines += [
            f"| {r['tp']} | {r['cache']} | " + " | ".join(f"{r[step]:.3f}" for step in STEPS) + " |" for r in steps
        ]
    lines += ["", "Goals (ratios of warm medians):", ""]
    lines += [
        f"- {'PASS' if g['pass'] else 'FAIL'}: TP{g['tp']} {g['name']} = {g['ratio']:.2f}× (goal {g['goal']})"
        for g in result["goals"]
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    add_data_argument(parser)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--cold-reps", type=int, default=3, help="cold-cache runs per system at the largest TP")
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--model", choices=list(CONFIGS), default="small", help="which checkpoint (see CONFIGS)")
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=list(SYSTEMS))
    parser.add_argument("--profile", type=Path, help="after the runs, one more of each under cProfile: files here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the parent never starts OpenMP's pool: forked ranks could deadlock on it
    # Off the clock: the imports of tp_loader's lazily imported names and of a first load (its plan files).
    for name in ("load", "load_into", "parallelize"):
        getattr(tp_loader, name)
    importlib.resources.files("tp_loader.plans")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    root = args.data / ("ready-llama-fp32" if args.model == "small" else f"ready-llama-{args.model}-fp32")
    roots = [root, second(root)] if any(s in BEFORE for s in args.systems) else [root]
    for seed, path in enumerate(roots):
        values(run_ranks(1, _prepare, path, CONFIGS[args.model], seed, timeout=1800))
    references = {path: torch.load(path / "reference.pt")["logits"] for path in roots}
    started, load_before = time.time(), os.getloadavg()
    runs: dict[tuple[int, str, str], list[dict]] = {}
    plan = [(rep, tp, "warm") for rep in range(args.reps) for tp in args.tp]
    plan += [(rep, max(args.tp), "cold") for rep in range(args.cold_reps)]
    for rep, tp, cache in plan:
        for system in args.systems:
            for path in roots:  # a reload reads the second checkpoint from storage; the first one is in use
                read = second(root) if system in BEFORE else root
                (evict if cache == "cold" and path == read else warm)(path)
            found = runs.setdefault((tp, cache, system), [])
            check = cache == "cold" or not found
            ranks = values(run_ranks(tp, _measure, system, root, references, check, timeout=900))
            run = {key: [r[key] for r in ranks] for key in ranks[0]}
            run["seconds"], run["built_s"] = max(run["seconds"]), max(run["built_s"])
            found.append(run)
            print(f"{cache} TP{tp} rep {rep + 1} {system:>34}: {run['seconds']:.2f} s", flush=True)
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
        for tp in args.tp:
            for system in args.systems:
                for path in roots:
                    warm(path)
                values(run_ranks(tp, _profile, system, root, args.profile, timeout=900))
        print(f"profiles in {args.profile}", flush=True)
    rows = [{"tp": tp, "cache": cache, "system": s, **_summary(r)} for (tp, cache, s), r in runs.items()]
    files = sorted(root.glob("*.safetensors"))
    result = {"machine": machine(), "versions": versions(), "model": args.model, "config": CONFIGS[args.model]}
    result |= {"rows": rows, "goals": _goals(rows)}
    result["started"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started))
    result["load_average"] = {"before": load_before, "after": os.getloadavg()}  # other work on the machine
    result |= {"checkpoint_gb": sum(f.stat().st_size for f in files) / 1e9, "num_files": len(files)}
    args.out.mkdir(parents=True, exist_ok=True)
    name = "ready" if args.model == "small" else f"ready-{args.model}"
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=1))
    (args.out / f"{name}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
