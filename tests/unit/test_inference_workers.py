"""How many batches the daemon scores at once, and on how many torch threads each."""

from __future__ import annotations

import os
import sys
import threading

import pytest
import torch
from pydantic import ValidationError

from daemon.service import inference_threads, inference_workers, lower_thread_priority
from daemon.settings import Settings

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


@pytest.mark.parametrize("cores", [1, 2, 4, 32])
def test_cpu_default_is_one_single_threaded_worker_per_core(
    monkeypatch: pytest.MonkeyPatch, cores: int
) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: cores)
    settings = Settings()
    workers = inference_workers(settings, CPU, compiled=False)
    assert workers == min(cores, 8)
    expected_threads = 1 if workers > 1 else max(1, cores // 2)
    assert inference_threads(settings, workers) == expected_threads


def test_cuda_and_compiled_score_one_batch_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    settings = Settings(inference_workers=4)
    assert inference_workers(settings, CUDA, compiled=False) == 1
    assert inference_workers(settings, CPU, compiled=True) == 1
    assert inference_workers(settings, CPU, compiled=False) == 4
    # One worker: the forward gets half the cores as intra-op threads.
    assert inference_threads(Settings(), 1) == 8


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
