"""Turns benchmark results into a markdown table with the targets checked, and a PNG plot."""

from __future__ import annotations

from pathlib import Path

MB = 1e6


def _rows(rows: list[dict], case: str) -> dict[str, dict]:
    return {r["system"]: r for r in rows if r["case"] == case}


def _cases(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["case"] for r in rows))


def table(rows: list[dict]) -> list[str]:
    lines = [
        "| case | system | median s | GB/s per rank | × raw read "
        "| peak anon MB (max rank) | shard MB (max rank) | bytes read per rank (MB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for case in _cases(rows):
        by_system = _rows(rows, case)
        raw = by_system.get("raw read")
        for system, row in by_system.items():
            shard = max(row["shard_bytes"])
            ratio = f"{row['median_s'] / raw['median_s']:.2f}" if raw else "—"
            read = (
                ", ".join(f"{b / MB:.0f}" for b in row["bytes_read"])
                if row["bytes_read"][0] is not None
                else "not reported"
            )
            lines.append(
                f"| {case} | {system} | {row['median_s']:.3f} | {shard / 1e9 / row['median_s']:.2f} | {ratio} "
                f"| {row['peak_anon_bytes'] / MB:.0f} | {shard / MB:.0f} | {read} |"
            )
    return lines


def targets(result: dict) -> list[str]:
    """The issue's targets, each with the measured figure and PASS/FAIL."""
    out = []

    def check(ok: bool, text: str) -> None:
        out.append(f"- {'PASS' if ok else 'FAIL'}: {text}")

    for case in _cases(result["tp"]):
        by = _rows(result["tp"], case)
        if "tp_loader" in by and "raw read" in by:
            ratio = by["tp_loader"]["median_s"] / by["raw read"]["median_s"]
            check(
                ratio <= 1.25,
                f"{case}: tp_loader {by['tp_loader']['median_s']:.3f} s = {ratio:.2f}× the raw-read limit "
                "(target ≤ 1.25×)",
            )
        if "tp_loader" in by:
            row = by["tp_loader"]
            worst = max(
                run_peak - (shard * 1.1 + 150 * MB)
                for run in row["runs"]
                for run_peak, shard in zip(run["peak_anon_bytes"], run["shard_bytes"])
            )
            check(
                worst <= 0,
                f"{case}: tp_loader peak anonymous memory {row['peak_anon_bytes'] / MB:.0f} MB "
                f"vs shard {max(row['shard_bytes']) / MB:.0f} MB × 1.1 + 150 MB",
            )
        if "tp_loader" in by and "raw read" in by and by["raw read"]["bytes_read"][0] is not None:
            off = max(abs(a - b) / b for a, b in zip(by["tp_loader"]["bytes_read"], by["raw read"]["bytes_read"]))
            check(
                off <= 0.01,
                f"{case}: tp_loader bytes read per rank within {off:.2%} of the raw read's preadv count "
                "(shard + replicated; target ≤ 1%)",
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
        for system in ("tp_loader", "raw read")
    }
    if all(len([r for r in result.get("sweep", []) if r["system"] == s]) >= 3 for s in fits):
        (r2, slope), (raw_r2, raw_slope) = fits["tp_loader"], fits["raw read"]
        check(
            r2 >= 0.98,
            f"sweep at TP{result['sweep_tp']}: tp_loader load time is linear in checkpoint size "
            f"(R² = {r2:.3f}, {slope:.3f} s per GB; "
            f"the raw read on the same machine: R² = {raw_r2:.3f}, {raw_slope:.3f} s per GB)",
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


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, Linux {m['kernel']}, "
        f"Python {m['python']}, torch {m['torch']}; "
        f"gloo on CPU, warm page cache; {result['reps']} repetitions, medians; run {result['started']}.",
        "",
        "Load time vs tensor-parallel degree (0.98 GB bf16 Llama-shaped checkpoint, 4 files):",
        "",
        *table(result["tp"]),
    ]
    if result.get("sweep"):
        lines += ["", f"Load time vs checkpoint size at TP{result['sweep_tp']}:", "", *table(result["sweep"])]
    lines += ["", "Targets:", "", *targets(result)]
    if result.get("notes"):
        lines += ["", "Notes:", "", *[f"- {n}" for n in result["notes"]]]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for system in dict.fromkeys(r["system"] for r in result["tp"]):
        points = [(r["world_size"], r["median_s"]) for r in result["tp"] if r["system"] == system]
        left.plot(*zip(*points), marker="o", label=system)
        sweep = [(r["checkpoint_gb"], r["median_s"]) for r in result.get("sweep", []) if r["system"] == system]
        if sweep:
            right.plot(*zip(*sorted(sweep)), marker="o", label=system)
    left.set(
        xlabel="tensor-parallel degree (ranks)",
        ylabel="load time, s (slowest rank)",
        title="0.98 GB bf16 checkpoint",
        xticks=sorted({r["world_size"] for r in result["tp"]}),
    )
    right.set(
        xlabel="checkpoint size, GB",
        ylabel="load time, s (slowest rank)",
        title=f"size sweep at TP{result.get('sweep_tp', 2)}",
    )
    for axis in (left, right):
        axis.set_yscale("log")
        axis.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=8)
    m = result["machine"]
    fig.suptitle(f"Measured on {m['cpu']}, {m['cores']} cores, gloo/CPU, warm cache ({result['started']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
