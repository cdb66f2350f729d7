"""Targets, verdicts and the printed table, computed from the measured numbers only; plots."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

from daemon.bench.plan import HALF_LOAD

TARGETS = {
    "c_over_b": 20.0,
    "c_over_a": 0.6,
    "p99_ms_at_half_load": 50.0,
    "rss_1m_symbols_bytes": 1 << 30,
    "rss_1m_symbols_snapshotting_bytes": 1 << 30,  # while their first snapshot round is written
    "serving_ceiling_windows_per_s": 60_000.0,
    "restore_seconds": 5.0,
}
GPU_CEILING_WINDOWS_PER_S = 1_000_000.0  # the ceiling target on a CUDA GPU


def code_version() -> dict[str, Any]:
    """The git commit the bench ran (and whether the tree had changes), so a report says
    which code it measured; None outside a git checkout."""
    import subprocess

    root = Path(__file__).resolve().parents[2]

    def git(*argv: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "-C", str(root), *argv], capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}


def machine_info() -> dict[str, Any]:
    import torch

    return {
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
    }


def judged_half_load(results: dict[str, Any]) -> dict[str, Any] | None:
    """The half-load figures the target is judged by: its windows pooled (reports after v21), or
    the one half-load window of an earlier report."""
    if results.get("half_load"):
        return dict(results["half_load"])
    return next((x for x in results.get("latency", []) if x["load_fraction"] == HALF_LOAD), None)


def latency_by_load(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per load fraction, in increasing order; the half load's pooled."""
    half = judged_half_load(results)
    rows = [x for x in results.get("latency", []) if x["load_fraction"] != HALF_LOAD]
    return sorted([*rows, *([half] if half else [])], key=lambda x: float(x["load_fraction"]))


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    """Ratios and target verdicts, computed from the measured numbers only."""
    a = float(results["a_ceiling"]["best"]["windows_per_s"])
    sweep_max = results["a_ceiling"]["best"].get("sweep_max_windows_per_s")
    targets = dict(TARGETS)
    if results["a_ceiling"].get("device") == "cuda":
        targets["serving_ceiling_windows_per_s"] = GPU_CEILING_WINDOWS_PER_S
    # --ceiling-only runs (a) alone: no end-to-end figures, so no ratios.
    b = float(results["b_naive"]["predictions_per_s"]) if "b_naive" in results else None
    c = float(results["c_tickcast"]["predictions_per_s"]) if "c_tickcast" in results else None
    half = judged_half_load(results)
    rss_1m = results.get("memory", {}).get("rss_bytes")
    rss_1m_snapshotting = results.get("memory", {}).get("rss_while_snapshotting_bytes")
    restore = results.get("restore")
    figures = {
        "a_windows_per_s": a,
        "b_ticks_per_s": b,
        "c_ticks_per_s": c,
        "c_over_b": round(c / b, 2) if b and c else None,
        "c_over_a": round(c / a, 3) if c else None,
        # Against the sweep's single fastest sample, as (a) was taken until v15: not judged.
        "c_over_a_sweep_max": round(c / sweep_max, 3) if c and sweep_max else None,
        "p99_ms_at_half_load": half["p99_ms"] if half else None,
        "rss_1m_symbols_bytes": rss_1m,
        "rss_1m_symbols_snapshotting_bytes": rss_1m_snapshotting,
        "serving_ceiling_windows_per_s": a,
        "restore_seconds": restore["subscribe_to_ready_seconds"] if restore else None,
    }
    met = {
        "c_over_b": b is not None and c is not None and c / b >= targets["c_over_b"],
        "c_over_a": c is not None and c / a >= targets["c_over_a"],
        "p99_ms_at_half_load": half is not None
        and half.get("complete", True)  # runs before v18 have no such field
        and half["p99_ms"] <= targets["p99_ms_at_half_load"],
        "rss_1m_symbols_bytes": rss_1m is not None and rss_1m <= targets["rss_1m_symbols_bytes"],
        "rss_1m_symbols_snapshotting_bytes": rss_1m_snapshotting is not None
        and rss_1m_snapshotting <= targets["rss_1m_symbols_snapshotting_bytes"],
        "serving_ceiling_windows_per_s": a >= targets["serving_ceiling_windows_per_s"],
        # The 5 s target is for 10,000 symbols x 1,000 ticks; smaller runs are not judged.
        "restore_seconds": restore is not None
        and restore["symbols"] * restore["ticks_per_symbol"] >= 10_000_000
        and restore["restored_windows_exact"]
        and restore["subscribe_to_ready_seconds"] <= targets["restore_seconds"],
    }
    return {"figures": figures, "targets": targets, "met": met}


def render_table(report: dict[str, Any]) -> str:
    """The human-readable summary printed at the end of a run."""
    r, summary, machine = report["results"], report["summary"], report["machine"]
    f, met = summary["figures"], summary["met"]
    mib = 2**20

    def verdict(key: str, target: str) -> str:
        return f"{target} {'met' if met.get(key) else 'MISSED'}"

    def row(label: str, value: str, target: str = "") -> str:
        return f"{label:<46}{value:>18}  {target}".rstrip()

    a = r["a_ceiling"]
    ceiling_target = ">= 1,000,000" if a.get("device") == "cuda" else ">= 60,000"
    lines = [
        f"tickcast bench ({machine['cores']} cores, {machine['cpu_capability']}, "
        f"load average {machine['load_average_at_start']} -> {machine.get('load_average_at_end')})",
        f"data: {r['data']}",
        "",
        row("figure", "value", "target"),
        row(
            "(a) model ceiling, windows/s",
            f"{f['a_windows_per_s']:,.0f}",
            verdict("serving_ceiling_windows_per_s", ceiling_target),
        ),
        row("    best path / batch", f"{a['best']['path']} / {a['best']['batch']}"),
        row(
            "    median of re-measurements (sweep's max)",
            f"{', '.join(f'{x:,}' for x in a['best']['confirmations'])} "
            f"({a['best']['sweep_max_windows_per_s']:,})",
        ),
        row(
            "    FLOP fraction of measured sgemm peak",
            f"{a['flop_fraction_of_sgemm_peak'] or 0:.3f}",
        ),
    ]
    if a.get("sgemm_peak_flops_2t"):  # CPU runs: the VM's speed in this run (this one
        # measured 155-361 GFLOP/s on different days; every figure below moves with it)
        peak = a["sgemm_peak_flops_2t"] / 1e9
        lines.append(row("    measured sgemm peak, 2 threads, GFLOP/s", f"{peak:,.0f}"))
    if "c_tickcast" in r:
        c = r["c_tickcast"]
        lines += [
            row("(b) naive end to end, ticks/s", f"{f['b_ticks_per_s']:,.0f}"),
            row("(c) tickcast end to end, ticks/s", f"{f['c_ticks_per_s']:,.0f}"),
        ]
        if len(c.get("drains_predictions_per_s", ())) > 1:
            rates = ", ".join(f"{x:,}" for x in c["drains_predictions_per_s"])
            lines.append(row("    median of the drains", rates))
        if "broker_warmup" in r:
            cold = r["broker_warmup"]["predictions_per_s"]
            lines.append(row("    the same on the cold broker (warm-up)", f"{cold:,.0f}"))
        lines += [
            row(
                "    every window predicted (distinct/expected)",
                f"{c['distinct_predictions']:,}/{c['windows_expected']:,}",
            ),
            row(
                "    daemon CPU cores / RSS MiB",
                f"{c['cpu_cores']:.2f} / {c['rss_max_bytes'] / mib:.0f}",
            ),
            row(
                "    machine cores busy / stolen by the hypervisor",
                f"{c['machine_busy_cores']:.2f} / {c['machine_stolen_cores']:.2f}",
            ),
            row("(c)/(b)", f"{f['c_over_b']:.1f}", verdict("c_over_b", ">= 20")),
            row("(c)/(a)", f"{f['c_over_a']:.3f}", verdict("c_over_a", ">= 0.6")),
        ]
        if f.get("c_over_a_sweep_max"):
            lines.append(
                row("    (c) / the sweep's max (not judged)", f"{f['c_over_a_sweep_max']:.3f}")
            )
    for load in latency_by_load(r):
        label = f"latency ms p50/p99/max, {load['load_fraction']:.2f} x (c)"
        target = ""
        if load["load_fraction"] == HALF_LOAD:
            target = verdict("p99_ms_at_half_load", "p99 <= 50 ms")
            if load.get("windows", 1) > 1:
                label += f", {load['windows']} windows"
        lines.append(
            row(
                f"{label} = {load['achieved_ticks_per_s']:,}/s",
                f"{load['p50_ms']:.1f}/{load['p99_ms']:.1f}/{load['max_ms']:.1f}",
                target,
            )
        )
        if load.get("windows", 1) > 1:
            lines.append(
                row(
                    "    p99 ms of each of those windows",
                    "/".join(f"{x:.0f}" for x in load["p99_ms_per_window"]),
                )
            )
        if "appended_p99_ms" in load:
            lines.append(
                row(
                    "    of it until the daemon appended the prediction, p50/p99 ms",
                    f"{load['appended_p50_ms']:.1f}/{load['appended_p99_ms']:.1f}",
                )
            )
    if "conflation" in r:
        lines.append(
            row(
                "conflation ingest, ticks/s (50 hot symbols)",
                f"{r['conflation']['ingest_ticks_per_s']:,}",
            )
        )
    if "memory" in r:
        m = r["memory"]
        lines.append(
            row(
                f"RSS MiB with {m['symbols']:,} symbols (at rest)",
                f"{m['rss_bytes'] / mib:,.0f}",
                verdict("rss_1m_symbols_bytes", "<= 1,024"),
            )
        )
        if "rss_while_snapshotting_bytes" in m:
            lines.append(
                row(
                    "  ... while writing their first snapshot round",
                    f"{m['rss_while_snapshotting_bytes'] / mib:,.0f}",
                    verdict("rss_1m_symbols_snapshotting_bytes", "<= 1,024"),
                )
            )
    if "restore" in r:
        x = r["restore"]
        lines.append(
            row(
                f"restore {x['symbols']:,} symbols x {x['ticks_per_symbol']:,} ticks, s",
                f"{x['subscribe_to_ready_seconds']:.2f}"
                + ("" if x["restored_windows_exact"] else " (NOT exact)"),
                verdict("restore_seconds", "<= 5 s at 10,000 x 1,000"),
            )
        )
    if "soak" in r:
        k = r["soak"]
        lines.append(
            row(
                f"soak {k['seconds']}s: RSS MiB start/end/max",
                f"{k['rss_start_bytes'] / mib:.0f}/{k['rss_end_bytes'] / mib:.0f}"
                f"/{k['rss_max_bytes'] / mib:.0f}",
            )
        )
    return "\n".join(lines)


def draw_plots(report: dict[str, Any], out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    r = report["results"]
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, curve in r["a_ceiling"]["curves"].items():
        ax.plot([int(b) for b in curve], list(curve.values()), marker="o", label=name)
    if "c_tickcast" in r:
        ax.axhline(r["c_tickcast"]["predictions_per_s"], color="k", ls="--", label="(c) end to end")
    ax.set(xscale="log", xlabel="batch size", ylabel="windows/s", title="throughput vs batch size")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(str(out_dir / "throughput_vs_batch.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    if rows := latency_by_load(r):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        x = [row["achieved_ticks_per_s"] for row in rows]
        for key in ("p50_ms", "p99_ms", "max_ms"):
            ax.plot(x, [row[key] for row in rows], marker="o", label=key[:-3])
        ax.set(xlabel="offered ticks/s", ylabel="ms", yscale="log", title="latency vs offered load")
        ax.legend()
        fig.tight_layout()
        paths.append(str(out_dir / "latency_vs_load.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths
