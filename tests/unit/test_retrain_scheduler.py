"""The ``--every`` scheduler outlives a run that raises; interrupts still stop it.

``retrain_once`` is replaced by a fake: what is tested is the loop in ``run_retrain``, not
training. The fake stops the scheduler the way an operator does, with SIGTERM (honoured
between runs).
"""

from __future__ import annotations

import argparse
import logging
import signal

import pytest

import model.retrain as retrain_module
from model.retrain import EXIT_USAGE, add_retrain_arguments, run_retrain


def scheduled() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_retrain_arguments(parser)
    return parser.parse_args(["--data", "dataset:goog", "--every", "1ms"])


def test_a_run_raising_does_not_stop_the_scheduler(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="model.retrain")
    outcomes: list[Exception | int] = [RuntimeError("CUDA error: an illegal memory access"), 0]
    runs: list[int] = []

    def fake_retrain_once(_args: argparse.Namespace) -> int:
        runs.append(len(runs) + 1)
        outcome = outcomes[len(runs) - 1]
        if isinstance(outcome, Exception):
            raise outcome
        signal.raise_signal(signal.SIGTERM)  # stop after this run
        return outcome

    monkeypatch.setattr(retrain_module, "retrain_once", fake_retrain_once)

    assert run_retrain(scheduled()) == 0

    assert runs == [1, 2]  # the second run happened after the first one raised
    failure = next(r for r in caplog.records if "retrain run 1 failed" in r.getMessage())
    assert failure.levelno == logging.ERROR
    assert failure.exc_info is not None  # logged with its traceback
    assert "RuntimeError: CUDA error: an illegal memory access" in caplog.text
    assert "retrain scheduler stopped after 2 runs (1 failed)" in caplog.text


def test_a_failed_exit_code_counts_as_a_failed_run(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="model.retrain")
    codes = iter([EXIT_USAGE, 0, 0])

    def fake_retrain_once(_args: argparse.Namespace) -> int:
        code = next(codes)
        if code == 0:
            signal.raise_signal(signal.SIGTERM)
        return code

    monkeypatch.setattr(retrain_module, "retrain_once", fake_retrain_once)
    assert run_retrain(scheduled()) == 0
    assert "retrain run 1 failed with exit code 2" in caplog.text
    assert "retrain scheduler stopped after 2 runs (1 failed)" in caplog.text


@pytest.mark.parametrize("stop", [KeyboardInterrupt, SystemExit])
def test_interrupts_still_stop_the_scheduler(
    monkeypatch: pytest.MonkeyPatch, stop: type[BaseException]
) -> None:
    runs: list[int] = []
    before = signal.getsignal(signal.SIGTERM)

    def fake_retrain_once(_args: argparse.Namespace) -> int:
        runs.append(1)
        raise stop

    monkeypatch.setattr(retrain_module, "retrain_once", fake_retrain_once)
    with pytest.raises(stop):
        run_retrain(scheduled())
    assert runs == [1]
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored on the way out
