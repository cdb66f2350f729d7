"""How many batches the daemon scores at once, and on how many torch threads each."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from daemon.inference import inference_threads, inference_workers, lower_thread_priority
from daemon.settings import Settings
from model.train import available_cpus, cgroup_cpu_quota

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


@pytest.mark.parametrize("cores", [1, 2, 4, 32])
def test_cpu_default_is_one_single_threaded_worker_per_core(
    monkeypatch: pytest.MonkeyPatch, cores: int
) -> None:
    monkeypatch.setattr("daemon.inference.available_cpus", lambda: cores)
    settings = Settings()
    workers = inference_workers(settings, CPU, compiled=False)
    assert workers == min(cores, 8)
    expected_threads = 1 if workers > 1 else max(1, cores // 2)
    assert inference_threads(settings, workers) == expected_threads


def test_cuda_and_compiled_score_one_batch_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("daemon.inference.available_cpus", lambda: 16)
    settings = Settings(inference_workers=4)
    assert inference_workers(settings, CUDA, compiled=False) == 1
    assert inference_workers(settings, CPU, compiled=True) == 1
    assert inference_workers(settings, CPU, compiled=False) == 4
    # One worker: the forward gets half the cores as intra-op threads.
    assert inference_threads(Settings(), 1) == 8


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"cpu.max": "200000 100000\n"}, 2.0),  # cgroup v2, a 2-CPU limit
        ({"cpu.max": "150000 100000\n"}, 1.5),
        ({"cpu.max": "max 100000\n"}, None),  # v2, unlimited
        ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3.0),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),  # no cgroup files at all
    ],
)
def test_cgroup_cpu_quota(tmp_path: Path, files: dict[str, str], expected: float | None) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_cpu_quota(tmp_path) == expected


def test_a_container_cpu_limit_caps_the_cpus(tmp_path: Path) -> None:
    """A pod limited to 1.5 CPUs on a bigger node: 2 CPUs' worth of threads, not one per
    core of the node (os.cpu_count() and the affinity both see the whole node)."""
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert available_cpus(tmp_path) == min(2, len(os.sched_getaffinity(0)))
    assert available_cpus(tmp_path / "missing") == len(os.sched_getaffinity(0))


def test_explicit_threads_win() -> None:
    assert inference_threads(Settings(torch_threads=3), 4) == 3


def test_compiled_with_several_workers_is_refused() -> None:
    with pytest.raises(ValidationError, match="one batch at a time"):
        Settings(inference="compiled", inference_workers=2)
    assert Settings(inference="compiled", inference_workers=1).inference_workers == 1


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread nice is Linux behaviour")
def test_inference_threads_run_at_a_lower_priority_than_the_event_loop() -> None:
    seen: list[tuple[int, int]] = []

    def probe() -> None:
        lower_thread_priority(7)
        tid = threading.get_native_id()
        seen.append((os.getpriority(os.PRIO_PROCESS, tid), tid))

    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    worker = threading.Thread(target=probe)
    worker.start()
    worker.join()
    assert seen[0][0] == min(19, base + 7)
    # Only that thread: the calling thread keeps its priority.
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base
