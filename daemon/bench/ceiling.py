"""(a): the model's own speed limit, ``Predictor.predict`` on in-memory batches."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from daemon.bench.load import TickSource
from daemon.bench.plan import WINDOW, Context

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def measure_rate(predict: Any, windows: np.ndarray, seconds: float) -> float:
    predict(windows)  # warm
    n, started = 0, time.perf_counter()
    while True:
        predict(windows)
        n += 1
        elapsed = time.perf_counter() - started
        if elapsed >= seconds and n >= 3:
            return len(windows) * n / elapsed


def measure_parallel_rate(predict: Any, windows: np.ndarray, seconds: float, workers: int) -> float:
    """``workers`` threads calling ``predict`` at once, as the daemon's inference workers
    do; all windows scored over the wall time from the common start (after every worker's
    warm-up call) to the end of the slowest (no partial overlap counted).
    """
    from concurrent.futures import ThreadPoolExecutor

    start = threading.Barrier(workers)

    def run(_: int) -> tuple[int, float, float]:
        predict(windows)  # warm: not timed (a first call can take many times a later one)
        start.wait()
        n, started = 0, time.perf_counter()
        while n < 3 or time.perf_counter() - started < seconds:
            predict(windows)
            n += 1
        return n, started, time.perf_counter()

    with ThreadPoolExecutor(workers) as pool:
        runs = list(pool.map(run, range(workers)))
    calls = sum(n for n, _, _ in runs)
    wall = max(end for _, _, end in runs) - min(began for _, began, _ in runs)
    return len(windows) * calls / wall


@dataclass
class CeilingProbe:
    """One point of the ceiling sweep (forward path, threads, workers, batch), measurable
    again. Short samples of one point vary by a third on this VM (0.6 s each: 65,000 to
    96,000 windows/s for the same batch of 1,024), so the fastest of a sweep's dozens of
    samples is its luckiest one; (a) is the median of longer re-measurements of the point
    the sweep picked, taken after the sweep and beside each (c) drain."""

    path: str
    batch: int
    predict: Callable[[np.ndarray], Any]
    threads: int
    workers: int
    windows: np.ndarray

    def measure(self, seconds: float) -> float:
        with torch_threads(self.threads):
            if self.workers > 1:
                return measure_parallel_rate(self.predict, self.windows, seconds, self.workers)
            return measure_rate(self.predict, self.windows, seconds)


def confirm_ceiling(ctx: Context) -> None:
    """Re-measure the sweep's best point; (a) becomes the median of the re-measurements."""
    probe, a = ctx.ceiling_probe, ctx.results["a_ceiling"]
    if probe is None:
        return
    best = a["best"]
    best["confirmations"].append(round(probe.measure(ctx.plan.confirm_seconds)))
    best["windows_per_s"] = round(float(np.median(best["confirmations"])))
    if a.get("sgemm_peak_flops_2t"):
        fraction = best["windows_per_s"] * a["flops_per_window"] / a["sgemm_peak_flops_2t"]
        a["flop_fraction_of_sgemm_peak"] = round(fraction, 3)


def sgemm_peak(threads: int, seconds: float) -> float:
    """Measured float32 matmul FLOP/s (2048^3), the practical roof of this CPU."""
    import torch

    a, b = torch.rand(2048, 2048), torch.rand(2048, 2048)
    with torch_threads(threads):
        torch.mm(a, b)
        n, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds or n < 3:
            torch.mm(a, b)
            n += 1
        return float(2 * 2048**3 * n / (time.perf_counter() - started))


def phase_ceiling(ctx: Context) -> dict[str, Any]:
    """(a): Predictor.predict alone over batch sizes, per forward path and thread count."""
    import torch

    from daemon.inference import inference_workers
    from daemon.predictor import Predictor, resolve_device
    from daemon.settings import Settings
    from model.checkpoint import load_latest
    from model.fast_gru import gru_flops

    plan = ctx.plan
    device = resolve_device(ctx.device)
    workers = inference_workers(Settings(), device, compiled=False)
    source = TickSource.build(64, WINDOW + 64)
    pool = np.lib.stride_tricks.sliding_window_view(source.prices, WINDOW, axis=1).reshape(
        -1, WINDOW
    )
    variants: list[tuple[str, dict[str, Any]]] = []
    if device.type == "cuda":
        variants.append(("cuda-graph", {"fast": False}))
    else:
        variants += [("nn.GRU", {"fast": False}), ("scripted-cell", {"fast": True})]
        if plan.compile_in_ceiling:  # --quick skips it: seconds of C++ compilation
            variants.append(("compiled-step", {"fast": True, "compile": "step"}))
        if plan.compile_loop_in_ceiling:
            variants.append(("compiled-loop", {"fast": True, "compile": "loop"}))
    curves: dict[str, dict[str, float]] = {}
    compile_s: dict[str, float | None] = {}
    best: tuple[float, CeilingProbe] | None = None
    for name, options in variants:
        predictor = Predictor(load_latest(ctx.checkpoint_dir, device), device, **options)
        if predictor.fast is not None and options.get("compile"):
            started = time.perf_counter()
            ok = predictor.fast.wait_compiled()
            compile_s[name] = round(time.perf_counter() - started, 1) if ok else None
            if not ok:
                logger.warning("%s unavailable: %s", name, predictor.fast.compile_error)
                continue
        # (threads per forward, forwards at once): the daemon's CPU default is one
        # single-threaded worker per core, so that is measured beside 1 and 2 threads.
        shapes = [(torch.get_num_threads(), 1)]
        if device.type == "cpu":
            shapes = [(1, 1), (2, 1)]
            if name == "scripted-cell" and workers > 1:
                shapes.append((1, workers))
        for threads, parallel in shapes:
            key = f"{name}/{threads}t" + (f"x{parallel}w" if parallel > 1 else "")
            curve: dict[str, float] = {}
            for batch in plan.batch_sizes:
                windows = np.ascontiguousarray(np.resize(pool, (batch, WINDOW)))
                probe = CeilingProbe(key, batch, predictor.predict, threads, parallel, windows)
                rate = probe.measure(plan.seconds_per_point)
                curve[str(batch)] = round(rate)
                if best is None or rate > best[0]:
                    best = rate, probe
            curves[key] = curve
            print(f"  ceiling {key:>22}: {curve}", flush=True)
    assert best is not None, "the ceiling sweep measured nothing"
    sweep_max, ctx.ceiling_probe = best
    result = {
        "what": "Predictor.predict (scale + forward + unscale), batches in memory, windows/s",
        "device": device.type,
        "curves": curves,
        "compile_seconds": compile_s,
        "best": {
            "path": ctx.ceiling_probe.path,
            "batch": ctx.ceiling_probe.batch,
            "windows_per_s": None,  # the median of the confirmations (confirm_ceiling)
            "sweep_max_windows_per_s": round(sweep_max),
            "confirm_seconds": plan.confirm_seconds,
            "confirmations": [],
        },
        "flops_per_window": gru_flops(),
        "flops_formula": "T*(6H^2 + 6H + 3H + 10H) + 2H + 1, H=64, T=60",
        "sgemm_peak_flops_2t": sgemm_peak(2, 1.0) if device.type == "cpu" else None,
        "flop_fraction_of_sgemm_peak": None,
    }
    ctx.results["a_ceiling"] = result
    confirm_ceiling(ctx)
    return result
