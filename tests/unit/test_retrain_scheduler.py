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


def scheduled(*extra: str, from_kafka: bool = False) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_retrain_arguments(parser)
    source = ["--from-kafka"] if from_kafka else ["--data", "dataset:goog"]
    return parser.parse_args([*source, "--every", "1ms", *extra])


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
    assert run_retrain(scheduled(from_kafka=True)) == 0  # a topic still filling: retried
    assert "retrain run 1 failed with exit code 2" in caplog.text
    assert "retrain scheduler stopped after 2 runs (1 failed)" in caplog.text


def test_a_first_run_refusing_its_data_files_stops_the_scheduler(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A missing or unusable --data file will not become usable by waiting: exit 2 at
    once, instead of a scheduler that stays up and never trains."""
    runs: list[int] = []

    def fake_retrain_once(_args: argparse.Namespace) -> int:
        runs.append(1)
        return EXIT_USAGE

    monkeypatch.setattr(retrain_module, "retrain_once", fake_retrain_once)
    assert run_retrain(scheduled()) == EXIT_USAGE
    assert runs == [1]


def test_flags_no_run_can_use_stop_the_scheduler_before_it_starts(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def never(_args: argparse.Namespace) -> int:
        raise AssertionError("no run may start")

    monkeypatch.setattr(retrain_module, "retrain_once", never)
    assert run_retrain(scheduled("--val-fraction", "0.7")) == EXIT_USAGE
    assert "--val-fraction must lie strictly between 0 and 0.5" in capsys.readouterr().err


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
