"""The phases that go through Kafka: the drains of (b) and (c), the live loads, the soak,
and the memory probe; :func:`run_phases` runs them all in order."""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from daemon.bench.ceiling import confirm_ceiling, phase_ceiling
from daemon.bench.child import ChildConfig, ChildDaemon
from daemon.bench.load import (
    PredictionReader,
    TickSource,
    TickWriter,
    latency_summary,
    producer_for,
    stage_summary,
)
from daemon.bench.plan import (
    COMMIT_POLL_COARSE_S,
    COMMIT_POLL_FINE_S,
    HALF_LOAD,
    PARTITIONS,
    WINDOW,
    Context,
    latency_schedule,
)
from daemon.bench.sampling import Sampler


async def drain_backlog(
    ctx: Context,
    name: str,
    child_settings: dict[str, Any],
    source: TickSource,
    ticks: int,
    *,
    fast: bool,
    compile: str | None,
    keep: bool = False,
) -> tuple[dict[str, Any], Any]:
    """Produce ``ticks`` first, then start a daemon and time it through the backlog.

    Timed from the first prediction's produce timestamp until the daemon's group has
    committed every input offset (it commits an offset only once the broker has
    acknowledged the prediction for it). The predictions are read afterwards, to check
    that every window was predicted once: a reader running alongside would take the
    daemon's CPU (a quarter of a core at 50,000 predictions/s) for a figure that does
    not need it. The reader stays on for the live phases when ``keep``.
    """
    topics = await ctx.topics(name)
    async with producer_for(ctx.bootstrap, ctx.idempotent) as producer:
        writer = TickWriter(source, producer, topics["input"])
        started = time.perf_counter()
        await writer.write_backlog(ticks)
        produce_s = time.perf_counter() - started
    conflate = bool(child_settings.get("conflate"))
    filling = source.n_symbols * (WINDOW - 1)  # ticks that only fill windows, unscored
    expected = None if conflate else ticks - filling
    child = ChildDaemon(
        ChildConfig(
            settings=ctx.child_config(topics, **child_settings), fast=fast, compile=compile
        ),
        ctx.work_dir / f"daemon-{name}.log",
    )
    sampler = Sampler(child)
    reader = PredictionReader(ctx.bootstrap, topics["output"])
    try:
        await child.wait_ready()
        done_at = await wait_committed(ctx.bootstrap, child.config.settings, topics, ticks)
        await reader.start()
        if not await reader.read_to_end(timeout_s=600):
            raise RuntimeError(f"{name}: read {reader.count} predictions, the topic has more")
        distinct = reader.distinct()
        if expected is not None and not reader.count == distinct == expected:
            raise RuntimeError(
                f"{name}: {reader.count} predictions ({distinct} distinct) for {expected} windows"
            )
        first_at = reader.first_produced_at()
        assert first_at is not None
        seconds = max(done_at - first_at, 1e-6)
        scored = distinct
        result: dict[str, Any] = {
            "ticks": ticks,
            "symbols": source.n_symbols,
            "windows_expected": expected,
            "predictions": scored,
            "distinct_predictions": distinct,
            "seconds": round(seconds, 3),
            "predictions_per_s": round(scored / seconds),
            "timed": "first prediction produced -> every input offset committed",
            "backlog_produce_s": round(produce_s, 2),
            **sampler.window(first_at, done_at),
        }
        if conflate:
            result["ingest_ticks_per_s"] = round((ticks - filling) / seconds)
        if child.compile_s is not None:
            result["compile_s"] = round(child.compile_s, 1)
        if keep:
            return result, (child, sampler, reader, topics, source)
    except BaseException:
        sampler.stop()
        child.stop()
        await reader.stop()
        raise
    sampler.stop()
    child.stop()
    await reader.stop()
    return result, None


async def wait_committed(
    bootstrap: str, settings: dict[str, Any], topics: dict[str, str], total: int
) -> float:
    """Wall time at which the daemon's group has committed ``total`` input offsets.

    Asked through a consumer of that group that never subscribes (OffsetFetch), which
    Tansu serves too; the admin client's ListConsumerGroupOffsets it does not. The poll
    is sparse while the end is far and dense near it: polling every 20 ms throughout
    cost the broker 0.14 of the 2 cores it shares with the daemon being timed (measured
    against polls every 100 ms), for a resolution only the last poll needs.
    """
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=settings["group_id"], enable_auto_commit=False
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topics["input"], p) for p in range(PARTITIONS)]
        first: tuple[float, int] | None = None  # first poll that saw progress
        while True:
            committed = sum([(await consumer.committed(tp)) or 0 for tp in tps])
            now = time.time()
            if committed >= total:
                return now
            if first is None and committed > 0:
                first = (now, committed)
            await asyncio.sleep(next_commit_poll_s(first, now, committed, total))
    finally:
        await consumer.stop()


def next_commit_poll_s(
    first: tuple[float, int] | None,
    now: float,
    committed: int,
    total: int,
    *,
    fine: float = COMMIT_POLL_FINE_S,
    coarse: float = COMMIT_POLL_COARSE_S,
) -> float:
    """Seconds until the next poll: half the time the commits so far say is left,
    between ``fine`` and ``coarse``; ``fine`` until there is a rate to go by, since a
    short drain (conflation: ~0.3 s) may end within its first two commits."""
    if first is None or committed <= first[1] or now <= first[0]:
        return fine
    rate = (committed - first[1]) / (now - first[0])
    return min(coarse, max(fine, 0.5 * (total - committed) / rate))


def freeze_garbage_collector() -> None:
    """Exempt the bench's long-lived objects (torch, clients, data) from collections.

    The load generator and the prediction reader share this process: a full collection
    that scans them stalled both for ~200 ms every few seconds (measured with gc
    callbacks), which showed up as 250 ms latency spikes that were not the daemon's.
    The daemon does the same after its start-up.
    """
    import gc

    gc.collect()
    gc.freeze()


async def live_loads(
    ctx: Context,
    kept: Any,
    rate_c: float,
    schedule: Sequence[float],
    seconds: float,
    warmup_s: float,
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Offered load at fractions of (c), in ``schedule`` order; latency = received - ts
    (wall clock in ticks). Returns every window, and the HALF_LOAD windows pooled: the
    latency of all their ticks together (None when the schedule has none).

    Each window also gives the part of the latency spent until the daemon appended the
    prediction to a produce batch (``appended_*``: ingest, batching, the forward pass and
    the record; the prediction's Kafka timestamp), the rest being its delivery through
    the broker to the reader."""
    _, sampler, reader, topics, source = kept
    out = []
    half_latencies: list[np.ndarray] = []
    half_appended: list[np.ndarray] = []
    freeze_garbage_collector()
    async with producer_for(ctx.bootstrap, ctx.idempotent) as producer:
        writer = TickWriter(source, producer, topics["input"])
        writer.next_tick = source.n_symbols * (source.prices.shape[1] // 2)
        writer.last_step_ts = int(time.time() * 1000) + 1
        # Steady state, not start-up: the JVM broker compiles its hot paths over its first
        # minute of load (measured: its CPU at a fixed rate fell from 0.8 to 0.25 cores).
        warm_from = reader.count
        sent, _ = await writer.write_at_rate(HALF_LOAD * rate_c, warmup_s)
        await reader.wait_for(warm_from + sent, timeout_s=120)
        for fraction in schedule:
            rate = fraction * rate_c
            before = reader.count
            started = time.time()
            sent, real_s = await writer.write_at_rate(rate, seconds)
            # Incomplete: the latency figures cover only what arrived, so not judged.
            complete = await reader.wait_for(before + sent, timeout_s=120)
            ended = time.time()
            received, ts = reader.arrays()
            mine = slice(before, before + sent)
            due = ts[mine] / 1000.0
            latency = received[mine] - due
            appended = reader.produced_at()[mine] - due
            # What the daemon kept up with: a backlog that grew during the load shows here.
            served_s = float(received[mine].max()) - started if len(latency) else real_s
            out.append(
                {
                    "load_fraction": fraction,
                    "offered_ticks_per_s": round(rate),
                    "achieved_ticks_per_s": round(sent / real_s),
                    "served_ticks_per_s": round(len(latency) / max(served_s, 1e-6)),
                    "ticks": sent,
                    "predicted": int(min(reader.count - before, sent)),
                    "complete": complete,
                    **latency_summary(latency),
                    **stage_summary("appended", appended),
                    **sampler.window(started, ended),
                }
            )
            if fraction == HALF_LOAD:
                half_latencies.append(latency)
                half_appended.append(appended)
            print(f"  live {fraction:.2f} x (c): {out[-1]}", flush=True)
            await asyncio.sleep(0.5)
    return out, pool_windows(out, half_latencies, HALF_LOAD, half_appended)


def pool_windows(
    windows: Sequence[dict[str, Any]],
    latencies: Sequence[np.ndarray],
    fraction: float,
    appended: Sequence[np.ndarray] = (),
) -> dict[str, Any] | None:
    """The windows offered at ``fraction`` as one: latency over all their ticks (given in
    ``latencies``, one array per such window, in order), complete only if each was; with
    ``appended`` (the same ticks' time until the prediction was appended), that stage
    pooled too."""
    mine = [w for w in windows if w["load_fraction"] == fraction]
    if not mine:
        return None
    return {
        "load_fraction": fraction,
        "windows": len(mine),
        "ticks": sum(w["ticks"] for w in mine),
        "predicted": sum(w["predicted"] for w in mine),
        "complete": all(w["complete"] for w in mine),
        "achieved_ticks_per_s": round(float(np.mean([w["achieved_ticks_per_s"] for w in mine]))),
        **latency_summary(np.concatenate(latencies)),
        **(stage_summary("appended", np.concatenate(appended)) if len(appended) else {}),
        "p99_ms_per_window": [w["p99_ms"] for w in mine],
    }


async def soak(ctx: Context, kept: Any, rate: float, seconds: float) -> dict[str, Any]:
    """Half load for ``seconds``; RSS sampled throughout (memory flatness)."""
    _, sampler, _, topics, source = kept
    async with producer_for(ctx.bootstrap, ctx.idempotent) as producer:
        writer = TickWriter(source, producer, topics["input"])
        writer.next_tick = source.n_symbols * (source.prices.shape[1] * 3 // 4)
        writer.last_step_ts = int(time.time() * 1000) + 1
        started = time.time()
        sent, real_s = await writer.write_at_rate(rate, seconds)
    samples = [(s[0], s[2]) for s in sampler.samples if s[0] >= started]
    t = np.array([s[0] for s in samples]) - started
    rss = np.array([s[1] for s in samples], dtype=np.float64)
    half = len(rss) // 2
    slope = float(np.polyfit(t[half:], rss[half:], 1)[0]) if half > 2 else float("nan")
    return {
        "seconds": round(real_s, 1),
        "ticks": sent,
        "offered_ticks_per_s": round(rate),
        "rss_start_bytes": int(rss[0]),
        "rss_end_bytes": int(rss[-1]),
        "rss_max_bytes": int(rss.max()),
        "rss_slope_second_half_bytes_per_min": round(slope * 60),
    }


def phase_memory(ctx: Context) -> dict[str, Any]:
    topics = {"input": "unused", "output": "unused", "dlq": "unused"}
    child = ChildDaemon(
        ChildConfig(
            settings=ctx.child_config(topics),
            mode="memory",
            memory_symbols=ctx.plan.memory_symbols,
        ),
        ctx.work_dir / "daemon-memory.log",
    )
    try:
        return child.read_json_line()
    finally:
        child.stop()


def ensure_checkpoint(checkpoint_dir: Path | None, work_dir: Path) -> tuple[Path, str]:
    """The given checkpoint dir, or a new one: PriceGRU with seeded random weights."""
    from model.checkpoint import CheckpointMeta, new_version, promote, read_latest, save_checkpoint

    if checkpoint_dir is not None:
        version = read_latest(checkpoint_dir)
        if version is None:
            raise SystemExit(f"tickcast bench: no LATEST in {checkpoint_dir}")
        return checkpoint_dir, f"{checkpoint_dir} (LATEST = {version})"
    import torch

    from model.gru import ModelConfig, PriceGRU

    root = work_dir / "checkpoints"
    torch.manual_seed(7)
    model = PriceGRU(ModelConfig())
    # Random head weights: the GRU's output matters (cost is the same as a trained model).
    torch.nn.init.normal_(model.head.weight, std=0.5)
    torch.nn.init.normal_(model.head.bias, std=0.05)
    version = new_version()
    save_checkpoint(root, model, CheckpointMeta(version=version, architecture=model.config))
    promote(root, version)
    return root, "PriceGRU(1->64, window 60) with seeded random weights (seed 7), untrained"


async def run_phases(ctx: Context, args: argparse.Namespace) -> dict[str, Any]:
    plan = ctx.plan
    r = ctx.results
    print("(a) model ceiling ...", flush=True)
    r["a_ceiling"] = await asyncio.to_thread(phase_ceiling, ctx)
    per_symbol = WINDOW - 1 + (plan.predictions + plan.symbols - 1) // plan.symbols  # backlog
    live_room = int(max(plan.loads) * 200_000 * plan.live_seconds * len(plan.loads))
    live_room += int(0.5 * 200_000 * plan.warmup_seconds)
    live_room += int(100_000 * plan.soak_seconds)
    source = TickSource.build(plan.symbols, 2 * (per_symbol + live_room // plan.symbols + 1))
    r["data"] = source.note
    freeze_garbage_collector()

    # Steady state, not start-up: the JVM broker compiles its hot paths over its first
    # minute of load (measured at 20,000 ticks/s: its JIT threads took 0.48, 0.18, then
    # 0.08 cores in three 10 s windows), which (c) would otherwise pay alone.
    print("broker warm-up: the (c) drain twice over, not counted ...", flush=True)
    filling = plan.symbols * (WINDOW - 1)  # ticks before each symbol's first full window
    ticks_c = filling + plan.predictions
    warmup_ticks = filling + 2 * plan.predictions
    r["broker_warmup"], _ = await drain_backlog(
        ctx,
        "warmup",
        {"max_batch_size": plan.max_batch_size},
        source,
        warmup_ticks,
        fast=True,
        compile=None,
    )
    print(f"  {r['broker_warmup']}", flush=True)

    print("(b) naive baseline: daemon, max_batch_size=1, nn.GRU ...", flush=True)
    naive_ticks = filling + plan.naive_predictions
    r["b_naive"], _ = await drain_backlog(
        ctx, "naive", {"max_batch_size": 1}, source, naive_ticks, fast=False, compile=None
    )
    r["b_naive"]["how"] = "the daemon itself with max_batch_size=1 and nn.GRU (fast=False)"
    print(f"  {r['b_naive']}", flush=True)

    # One ~5 s drain on this VM moved by a fifth between runs minutes apart (52,253 and
    # 63,791 ticks/s in v12 and v13), so (c) is the median drain of several, each on a
    # fresh daemon; all rates are kept. The last daemon stays on for the live phases.
    print(f"(c) tickcast end to end: median of {plan.c_drains} drains ...", flush=True)
    compile = None if plan.compile == "none" else plan.compile
    drains: list[dict[str, Any]] = []
    for i in range(plan.c_drains):
        # (a) again just before: the VM's speed drifts over minutes, and (c)/(a) should
        # compare the two in the same stretch of it.
        await asyncio.to_thread(confirm_ceiling, ctx)
        drain, kept = await drain_backlog(
            ctx,
            "tickcast",
            {"max_batch_size": plan.max_batch_size},
            source,
            ticks_c,
            fast=True,
            compile=compile,
            keep=i == plan.c_drains - 1,
        )
        print(f"  {drain}", flush=True)
        drains.append(drain)
    forward = f"compiled ({compile})" if compile else "TorchScript"
    r["c_tickcast"] = {
        **sorted(drains, key=lambda d: d["predictions_per_s"])[len(drains) // 2],
        "drains_predictions_per_s": [d["predictions_per_s"] for d in drains],
        "forward": f"explicit GRU cell, {forward}",
    }
    child, sampler, reader, _, _ = kept
    try:
        rate_c = float(r["c_tickcast"]["predictions_per_s"])
        print(f"latency under offered load (after {plan.warmup_seconds:.0f} s at half load) ...")
        schedule = latency_schedule(plan.loads, plan.half_load_windows)
        r["latency"], r["half_load"] = await live_loads(
            ctx, kept, rate_c, schedule, plan.live_seconds, plan.warmup_seconds
        )
        if plan.soak_seconds:
            print(f"soak {plan.soak_seconds:.0f}s at half load ...", flush=True)
            r["soak"] = await soak(ctx, kept, 0.5 * rate_c, plan.soak_seconds)
    finally:
        sampler.stop()
        child.stop()
        await reader.stop()

    print(f"conflation: {plan.conflate_symbols} hot symbols ...", flush=True)
    hot = TickSource.build(
        plan.conflate_symbols, WINDOW + plan.conflate_ticks // plan.conflate_symbols + 2
    )
    conflate_ticks = plan.conflate_symbols * (WINDOW - 1) + plan.conflate_ticks
    r["conflation"], _ = await drain_backlog(
        ctx,
        "conflate",
        {"max_batch_size": plan.max_batch_size, "conflate": True},
        hot,
        conflate_ticks,
        fast=True,
        compile=None,
    )
    print(f"  {r['conflation']}", flush=True)

    if plan.restore_symbols and not ctx.idempotent:
        print("restore: skipped (its daemon and producers are idempotent; Tansu refuses them)")
    elif plan.restore_symbols:
        from daemon.bench.restore import measure_restore

        print(
            f"restore: {plan.restore_symbols:,} symbols x {plan.restore_ticks:,} ticks "
            "behind the committed offset ...",
            flush=True,
        )
        r["restore"] = await measure_restore(
            ctx.bootstrap,
            ctx.checkpoint_dir,
            symbols=plan.restore_symbols,
            ticks_per_symbol=plan.restore_ticks,
        )
        print(f"  {r['restore']}", flush=True)

    if plan.memory_symbols:
        print(f"memory: {plan.memory_symbols:,} symbols ...", flush=True)
        r["memory"] = await asyncio.to_thread(phase_memory, ctx)
        print(f"  {r['memory']}", flush=True)
    return r
