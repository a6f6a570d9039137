"""Turns benchmark results into markdown tables with the targets checked, and PNG plots: the warm-process table of
``benchmarks.run`` and the fresh-process table of ``benchmarks.fresh``. Every figure printed comes from the result
dict: no version, size or machine is written in here."""

from __future__ import annotations

import statistics
from pathlib import Path

from benchmarks.systems import RAW, TPLoader, TPLoaderCopying

MB = 1e6
SPREAD_FLAG = 0.20
ZERO_COPY, COPYING = TPLoader.name, TPLoaderCopying.name
#: Peak anonymous memory allowed per rank: the copying mode its shard × 1.1 + 150 MB, zero-copy 150 MB.
MEMORY_SLACK = 150 * MB
CACHES_PLOTTED = ("warm", "cold")


def timing(seconds: list[float]) -> dict:
    """Median, min, max and spread ((max − min) / median) of one row's runs."""
    median = statistics.median(seconds)
    low, high = min(seconds), max(seconds)
    return {"median_s": median, "min_s": low, "max_s": high, "spread": (high - low) / median}


def rows_with_limit(rows: list[dict]) -> list[dict]:
    """Marks, per case, the raw-read strategy with the lowest median: the raw-read limit."""
    for case in dict.fromkeys(r["case"] for r in rows):
        raw = [r for r in rows if r["case"] == case and r["system"] in RAW]
        best = min(raw, key=lambda r: r["median_s"]) if raw else None
        for row in rows:
            if row["case"] == case:
                row["limit_system"] = best["system"] if best else None
                row["limit_s"] = best["median_s"] if best else None
    return rows


def memory_target(system: str, peaks: list[int], shards: list[int]) -> tuple[bool, str]:
    """Whether every (peak, shard) pair of a tp_loader mode keeps within its bound, and the bound in words."""
    if system == ZERO_COPY:
        return all(peak <= MEMORY_SLACK for peak in peaks), f"≤ {MEMORY_SLACK / MB:.0f} MB (zero-copy)"
    ok = all(peak <= shard * 1.1 + MEMORY_SLACK for peak, shard in zip(peaks, shards))
    return ok, f"≤ shard {max(shards) / MB:.0f} MB × 1.1 + {MEMORY_SLACK / MB:.0f} MB (copying)"


def _rows(rows: list[dict], case: str) -> dict[str, dict]:
    return {r["system"]: r for r in rows if r["case"] == case}


def _cases(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["case"] for r in rows))


def _per_rank(values: list[int] | None) -> str:
    """One figure when the ranks agree to 1 MB, else ``min–max`` over the ranks."""
    if not values or values[0] is None:
        return "—"
    low, high = min(values), max(values)
    return f"{high / MB:.0f}" if high - low < MB else f"{low / MB:.0f}–{high / MB:.0f}"


def _shards(row: dict) -> str:
    check = row.get("check")
    if not check:
        return "not checked"
    if check["same_shards_as_tp_loader"]:
        return "same"
    return f"{check['num_differences']} differ"


def table(rows: list[dict]) -> list[str]:
    lines = [
        "| case | system | median s (min–max) | spread | × limit | GB/s per rank | peak anon MB "
        "| planned MB per rank | its pages MB | storage read MB per rank (cold) | read() MB per rank (warm) "
        "| shards vs tp_loader |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for case in _cases(rows):
        for system, row in _rows(rows, case).items():
            shard = max(row["planned_bytes"])
            flag = " ⚠" if row["spread"] > SPREAD_FLAG else ""
            limit = row.get("limit_s")
            ratio = f"{row['median_s'] / limit:.2f}" if limit else "—"
            name = f"**{system}** (limit)" if system == row.get("limit_system") else system
            storage = (row.get("check") or {}).get("storage_read_bytes")
            pages = (row.get("check") or {}).get("page_bytes")
            lines.append(
                f"| {case} | {name} | {row['median_s']:.3f} ({row['min_s']:.3f}–{row['max_s']:.3f}) "
                f"| {row['spread']:.0%}{flag} | {ratio} | {shard / 1e9 / row['median_s']:.2f} "
                f"| {row['peak_anon_bytes'] / MB:.0f} | {_per_rank(row['planned_bytes'])} | {_per_rank(pages)} "
                f"| {_per_rank(storage)} "
                f"| {_per_rank(row['read_syscall_bytes'])} | {_shards(row)} |"
            )
    return lines


def targets(result: dict) -> list[str]:
    """The issue's targets for the warm-process table, each with the measured figure and PASS/FAIL."""
    out = []

    def check(ok: bool, text: str) -> None:
        out.append(f"- {'PASS' if ok else 'FAIL'}: {text}")

    for case in _cases(result["tp"]):
        by = _rows(result["tp"], case)
        for system in (ZERO_COPY, COPYING):
            if system not in by:
                continue
            ours = by[system]
            if ours.get("limit_s"):
                ratio = ours["median_s"] / ours["limit_s"]
                check(
                    ratio <= 1.25,
                    f"{case}: {system} {ours['median_s']:.3f} s = {ratio:.2f}× the raw-read limit "
                    f"({ours['limit_system']}, {ours['limit_s']:.3f} s; target ≤ 1.25×)",
                )
            peaks = [p for run in ours["runs"] for p in run["peak_anon_bytes"]]
            shards = [b for run in ours["runs"] for b in run["planned_bytes"]]
            ok, bound = memory_target(system, peaks, shards)
            check(ok, f"{case}: {system} peak anonymous memory {max(peaks) / MB:.0f} MB per rank, target {bound}")
        raw = by.get("raw preadv")
        ours = by.get(ZERO_COPY)
        if ours and ours.get("check") and raw and raw.get("check"):
            mine, theirs = ours["check"]["storage_read_bytes"], raw["check"]["storage_read_bytes"]
            off = max(abs(a - b) / b for a, b in zip(mine, theirs))
            check(
                off <= 0.01,
                f"{case}: {ZERO_COPY}'s storage bytes read per rank (cold) within {off:.2%} of the raw preadv's "
                "(target ≤ 1%)",
            )
    tp2 = _rows(result["tp"], "TP2")
    for ours in (ZERO_COPY, COPYING):
        for peer, factor in (("transformers", 4), ("DCP", 3)):
            if ours in tp2 and peer in tp2:
                speedup = tp2[peer]["median_s"] / tp2[ours]["median_s"]
                check(speedup >= factor, f"TP2: {ours} is {speedup:.1f}× as fast as {peer} (target ≥ {factor}×)")
    fits = {
        system: _linear_fit(
            [(r["checkpoint_gb"], r["median_s"]) for r in result.get("sweep", []) if r["system"] == system]
        )
        for system in (ZERO_COPY, "raw preadv")
    }
    if all(len([r for r in result.get("sweep", []) if r["system"] == s]) >= 3 for s in fits):
        (r2, slope), (raw_r2, raw_slope) = fits[ZERO_COPY], fits["raw preadv"]
        check(
            r2 >= 0.98,
            f"sweep at TP{result['sweep_tp']}: {ZERO_COPY} load time is linear in checkpoint size "
            f"(R² = {r2:.3f}, {slope:.3f} s per GB; raw preadv: R² = {raw_r2:.3f}, {raw_slope:.3f} s per GB)",
        )
    return out


def _linear_fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """``(R², slope)`` of a least-squares line through ``points``; ``(0, 0)`` for fewer than two."""
    n = len(points)
    if n < 2:
        return 0.0, 0.0
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    sxy = sum((x - mx) * (y - my) for x, y in points)
    slope = sxy / sxx
    ss_res = sum((y - (my + slope * (x - mx))) ** 2 for x, y in points)
    ss_tot = sum((y - my) ** 2 for _, y in points) or 1e-12
    return 1 - ss_res / ss_tot, slope


def _differences(rows: list[dict]) -> list[str]:
    out = []
    for row in rows:
        check = row.get("check")
        if check and not check["same_shards_as_tp_loader"]:
            shown = "; ".join(check["differences"][:5])
            out.append(f"- {row['case']} {row['system']}: {check['num_differences']} differences ({shown})")
    return out


def _fixed(fixed: dict) -> list[str]:
    def span(values: list[float]) -> str:
        ordered = sorted(values)
        return f"{ordered[len(ordered) // 2]:.3f} s ({ordered[0]:.3f}–{ordered[-1]:.3f})"

    return [
        f"Fixed cost (tp_loader, fresh ranks at world size {fixed['world_size']}, "
        f"{fixed['checkpoint_bytes'] / MB:.1f} MB checkpoint, {len(fixed['first_s'])} fresh process groups, "
        "slowest rank, median (min–max)):",
        "",
        f"- first load in a fresh process: {span(fixed['first_s'])}",
        f"- second load in the same process: {span(fixed['second_s'])}",
        f"- `import torch._dynamo` alone in a fresh process: {span(fixed['dynamo_import_s'])}",
    ]


def _loads(values: list[float]) -> str:
    return "/".join(f"{v:.1f}" for v in values)


def _machine_line(result: dict, how: str) -> str:
    """The machine, versions, method in a few words (``how``), repetitions, start time and load average."""
    m, v = result["machine"], result.get("versions", {})
    return (
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, Linux {m['kernel']}, "
        f"Python {m['python']}; " + ", ".join(f"{name} {version}" for name, version in v.items()) + "; "
        f"gloo on CPU, {how}; {result['reps']} repetitions, median (min–max) of the slowest rank; "
        f"run {result['started']}."
        + (
            f" Load average (1/5/15 min) before the run {_loads(result['load_average']['before'])}, "
            f"after {_loads(result['load_average']['after'])}."
            if result.get("load_average")
            else ""
        )
    )


def markdown(result: dict) -> str:
    gb = result["tp"][0]["checkpoint_gb"] if result["tp"] else 0
    lines = [
        _machine_line(result, "ranks forked from a warm process, warm page cache"),
        "",
        f"Load time vs tensor-parallel degree ({gb:.2f} GB bf16 Llama-shaped checkpoint); "
        f"⚠ marks a spread (max − min over median) above {SPREAD_FLAG:.0%}:",
        "",
        *table(result["tp"]),
    ]
    if result.get("sweep"):
        lines += ["", f"Load time vs checkpoint size at TP{result['sweep_tp']}:", "", *table(result["sweep"])]
    differences = _differences(result["tp"])
    if differences:
        lines += ["", "Shards that differ from tp_loader's:", "", *differences]
    if result.get("fixed_cost"):
        lines += ["", *_fixed(result["fixed_cost"])]
    return _with_targets_and_notes(lines, targets(result), result.get("notes", []))


def _with_targets_and_notes(lines: list[str], checked: list[str], notes: list[str]) -> str:
    lines = [*lines, "", "Targets:", "", *checked]
    if notes:
        lines += ["", "Notes:", "", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if result.get("sweep") else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels + 1, 4.4), squeeze=False)
    left = axes[0][0]
    for system in dict.fromkeys(r["system"] for r in result["tp"]):
        rows = [r for r in result["tp"] if r["system"] == system]
        x = [r["world_size"] for r in rows]
        y = [r["median_s"] for r in rows]
        err = [[r["median_s"] - r["min_s"] for r in rows], [r["max_s"] - r["median_s"] for r in rows]]
        left.errorbar(x, y, yerr=err, marker="o", capsize=3, label=system)
    gb = result["tp"][0]["checkpoint_gb"] if result["tp"] else 0
    left.set(
        xlabel="tensor-parallel degree (ranks)",
        ylabel="load time, s (slowest rank; bars: min–max)",
        title=f"{gb:.2f} GB bf16 checkpoint",
        xticks=sorted({r["world_size"] for r in result["tp"]}),
    )
    left.set_yscale("log")
    left.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=7)
    if panels == 2:
        right = axes[0][1]
        for system in dict.fromkeys(r["system"] for r in result["sweep"]):
            sweep = sorted((r["checkpoint_gb"], r["median_s"]) for r in result["sweep"] if r["system"] == system)
            right.plot(*zip(*sweep), marker="o", label=system)
        right.set(xlabel="checkpoint size, GB", ylabel="load time, s", title=f"size sweep at TP{result['sweep_tp']}")
        right.set_yscale("log")
        right.grid(True, which="both", alpha=0.3)
    m = result["machine"]
    fig.suptitle(f"{m['cpu']}, {m['cores']} cores, gloo/CPU, warm cache ({result['started']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _span(values: list[float]) -> str:
    """``median (min–max)`` of seconds."""
    return f"{statistics.median(values):.3f} ({min(values):.3f}–{max(values):.3f})"


def fresh_table(rows: list[dict]) -> list[str]:
    lines = [
        "| TP | cache | system | load s, median (min–max) | spread | × raw read | peak anon MB per rank "
        "| shard MB per rank | import s | PG set-up s | launch → loaded s | imported on the clock | shards vs "
        f"{ZERO_COPY} |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        flag = " ⚠" if row["spread"] > SPREAD_FLAG else ""
        limit = row.get("limit_s")
        name = f"**{row['system']}** (limit)" if row["system"] == row.get("limit_system") else row["system"]
        check = row.get("check")
        shards = "not checked" if not check else "same" if check["same"] else f"{check['num_differences']} differ"
        ratio = f"{row['median_s'] / limit:.2f}" if limit else "—"
        lines.append(
            f"| {row['tp']} | {row['cache']} | {name} | {row['median_s']:.3f} ({row['min_s']:.3f}–{row['max_s']:.3f}) "
            f"| {row['spread']:.0%}{flag} | {ratio} "
            f"| {row['peak_anon_bytes'] / MB:.0f} | {_per_rank(row['shard_bytes'])} | {row['import_s']:.2f} "
            f"| {row['pg_s']:.2f} | {row['launch_to_loaded_s']:.2f} | {len(row['imported_on_clock'])} | {shards} |"
        )
    return lines


def fresh_targets(result: dict) -> list[str]:
    """The issue's targets on fresh-process medians, each with the figure and PASS/FAIL."""
    out = []
    by = {(r["tp"], r["cache"], r["system"]): r for r in result["rows"]}

    def check(ok: bool, text: str) -> None:
        out.append(f"- {'PASS' if ok else 'FAIL'}: {text}")

    for (tp, cache, system), row in by.items():
        if system not in (ZERO_COPY, COPYING):
            continue
        mode = " (the default)" if system == ZERO_COPY else ""
        if row.get("limit_s"):
            ratio, goal = row["median_s"] / row["limit_s"], 1.3 if cache == "warm" else 1.1
            check(
                ratio <= goal,
                f"TP{tp} {cache}: {system}{mode} {row['median_s']:.3f} s = {ratio:.2f}× the {cache} raw read "
                f"({row['limit_system']}, {row['limit_s']:.3f} s; target ≤ {goal}×)",
            )
        peaks = [p for run in row["runs"] for p in run["peak_anon_bytes"]]
        shards = [b for run in row["runs"] for b in run["shard_bytes"]]
        ok, bound = memory_target(system, peaks, shards)
        check(ok, f"TP{tp} {cache}: {system} peak anonymous memory {max(peaks) / MB:.0f} MB per rank, target {bound}")
    for system in (ZERO_COPY, COPYING):
        for peer in ("DCP", "transformers"):
            ours, theirs = by.get((2, "warm", system)), by.get((2, "warm", peer))
            if ours and theirs:
                speedup = theirs["median_s"] / ours["median_s"]
                mode = " (the default)" if system == ZERO_COPY else ""
                check(speedup >= 3, f"TP2 warm: {system}{mode} is {speedup:.1f}× as fast as {peer} (target ≥ 3×)")
    return out


def _torchrun(torchrun: dict) -> list[str]:
    bare, ours = torchrun["bare_s"], torchrun["tp_loader_s"]
    return [
        f"torchrun at TP {torchrun['world_size']}, from its start to its exit, warm cache, {len(bare)} launches each, "
        "median (min–max):",
        "",
        f"- a script that imports torch and sets up and destroys the gloo process group: {_span(bare)} s",
        f"- `python -m tp_loader MODEL` (the load and its report): {_span(ours)} s",
        f"- difference (tp_loader's imports, its load and its report): "
        f"{statistics.median(ours) - statistics.median(bare):.3f} s",
    ]


def fresh_markdown(result: dict) -> str:
    lines = [
        _machine_line(result, "one fresh process per rank, warm and cold page cache"),
        "",
        f"Load time in fresh processes ({result['checkpoint_gb']:.2f} GB bf16 Llama-shaped checkpoint); × raw read "
        f"divides by the fastest raw read of the same TP and cache (bold); ⚠ marks a spread above {SPREAD_FLAG:.0%}:",
        "",
        *fresh_table(result["rows"]),
    ]
    differences = [
        f"- TP{r['tp']} {r['system']}: {r['check']['num_differences']} ({'; '.join(r['check']['differences'][:5])})"
        for r in result["rows"]
        if r.get("check") and not r["check"]["same"]
    ]
    if differences:
        lines += ["", f"Shards that differ from {ZERO_COPY}'s:", "", *differences]
    on_clock = sorted({m.split(".")[0] for r in result["rows"] for m in r["imported_on_clock"]})
    if on_clock:
        lines += ["", f"Packages with modules imported on the clock (by some system): {', '.join(on_clock)}."]
    if result.get("torchrun"):
        lines += ["", *_torchrun(result["torchrun"])]
    return _with_targets_and_notes(lines, fresh_targets(result), result.get("notes", []))


def fresh_plot(result: dict, path: Path) -> None:
    """Bars of the median load time per system at each TP (min–max as error bars), warm and cold side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    systems = list(dict.fromkeys(r["system"] for r in rows))
    tps = sorted({r["tp"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
    width = 0.8 / max(1, len(systems))
    for ax, cache in zip(axes, CACHES_PLOTTED):
        for i, system in enumerate(systems):
            found = {r["tp"]: r for r in rows if r["system"] == system and r["cache"] == cache}
            x = [j + (i - (len(systems) - 1) / 2) * width for j, tp in enumerate(tps) if tp in found]
            y = [found[tp]["median_s"] for tp in tps if tp in found]
            err = [
                [found[tp]["median_s"] - found[tp]["min_s"] for tp in tps if tp in found],
                [found[tp]["max_s"] - found[tp]["median_s"] for tp in tps if tp in found],
            ]
            ax.bar(x, y, width, yerr=err, capsize=2, label=system, color=f"C{i}")
        ax.set_xticks(range(len(tps)), [f"TP {tp}" for tp in tps])
        ax.set_yscale("log")
        ax.grid(True, axis="y", which="both", alpha=0.3)
        ax.set_title(f"{cache} page cache")
    axes[0].set_ylabel("load s in a fresh process (slowest rank; bars: min–max)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(5, len(systems)), fontsize=8)
    m = result["machine"]
    fig.suptitle(
        f"{result['checkpoint_gb']:.2f} GB bf16 checkpoint; {m['cpu']}, {m['cores']} cores, gloo/CPU "
        f"({result['started']})",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
