"""Turns benchmark results into a markdown table with the targets checked, and a PNG plot. Every figure
printed comes from the result dict: no version, size or machine is written in here."""

from __future__ import annotations

from pathlib import Path

MB = 1e6
SPREAD_FLAG = 0.20


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
    """The issue's targets, each with the measured figure and PASS/FAIL."""
    out = []

    def check(ok: bool, text: str) -> None:
        out.append(f"- {'PASS' if ok else 'FAIL'}: {text}")

    for case in _cases(result["tp"]):
        by = _rows(result["tp"], case)
        if "tp_loader" not in by:
            continue
        ours = by["tp_loader"]
        if ours.get("limit_s"):
            ratio = ours["median_s"] / ours["limit_s"]
            check(
                ratio <= 1.25,
                f"{case}: tp_loader {ours['median_s']:.3f} s = {ratio:.2f}× the raw-read limit "
                f"({ours['limit_system']}, {ours['limit_s']:.3f} s; target ≤ 1.25×)",
            )
        worst = max(
            run_peak - (shard * 1.1 + 150 * MB)
            for run in ours["runs"]
            for run_peak, shard in zip(run["peak_anon_bytes"], run["planned_bytes"])
        )
        check(
            worst <= 0,
            f"{case}: tp_loader peak anonymous memory {ours['peak_anon_bytes'] / MB:.0f} MB "
            f"vs shard {max(ours['planned_bytes']) / MB:.0f} MB × 1.1 + 150 MB",
        )
        raw = by.get("raw preadv")
        if ours.get("check") and raw and raw.get("check"):
            mine, theirs = ours["check"]["storage_read_bytes"], raw["check"]["storage_read_bytes"]
            off = max(abs(a - b) / b for a, b in zip(mine, theirs))
            check(
                off <= 0.01,
                f"{case}: tp_loader's storage bytes read per rank (cold) within {off:.2%} of the raw preadv's "
                "(target ≤ 1%)",
            )
    tp2 = _rows(result["tp"], "TP2")
    for ours in ("tp_loader", "tp_loader zero-copy"):
        for peer, factor in (("transformers", 4), ("DCP", 3)):
            if ours in tp2 and peer in tp2:
                speedup = tp2[peer]["median_s"] / tp2[ours]["median_s"]
                check(speedup >= factor, f"TP2: {ours} is {speedup:.1f}× as fast as {peer} (target ≥ {factor}×)")
    fits = {
        system: _linear_fit(
            [(r["checkpoint_gb"], r["median_s"]) for r in result.get("sweep", []) if r["system"] == system]
        )
        for system in ("tp_loader", "raw preadv")
    }
    if all(len([r for r in result.get("sweep", []) if r["system"] == s]) >= 3 for s in fits):
        (r2, slope), (raw_r2, raw_slope) = fits["tp_loader"], fits["raw preadv"]
        check(
            r2 >= 0.98,
            f"sweep at TP{result['sweep_tp']}: tp_loader load time is linear in checkpoint size "
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


def markdown(result: dict) -> str:
    m, v = result["machine"], result.get("versions", {})
    gb = result["tp"][0]["checkpoint_gb"] if result["tp"] else 0
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, Linux {m['kernel']}, "
        f"Python {m['python']}; " + ", ".join(f"{name} {version}" for name, version in v.items()) + "; "
        f"gloo on CPU, warm page cache; {result['reps']} repetitions, median (min–max) of the slowest rank; "
        f"run {result['started']}."
        + (
            f" Load average (1/5/15 min) before the run {_loads(result['load_average']['before'])}, "
            f"after {_loads(result['load_average']['after'])}."
            if result.get("load_average")
            else ""
        ),
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
    lines += ["", "Targets:", "", *targets(result)]
    if result.get("notes"):
        lines += ["", "Notes:", "", *[f"- {n}" for n in result["notes"]]]
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
