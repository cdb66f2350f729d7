"""Bad input to the ``tickcast`` commands is one clear line on stderr, never a traceback."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from daemon import demo
from daemon.bench.plan import BATCH_SIZES, Plan
from daemon.cli import build_parser, device_error, main
from daemon.embedded_kafka import pick_free_ports
from model.data import DataError, load_series
from tests.support.daemon import make_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """The commands configure logging for a process; give the test process its own back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    levels = {name: logging.getLogger(name).level for name in ("aiokafka", "kafka")}
    yield
    root.handlers[:], root.level = handlers, level
    for name, saved in levels.items():
        logging.getLogger(name).setLevel(saved)


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.fixture
def prices_csv(tmp_path: Path) -> Path:
    path = tmp_path / "abc.csv"
    rows = [f"2020-01-{day:02d},{100 + day}" for day in range(1, 21)]
    path.write_text("Date,Close\n" + "\n".join(rows) + "\n")
    return path


def usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The argparse error line for ``argv`` (which must exit 2)."""
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


# ---------------------------------------------------------------------------- F9 (a)
def test_a_date_beyond_the_supported_range_is_a_data_error(tmp_path: Path) -> None:
    path = tmp_path / "far.csv"
    path.write_text("Date,Close\n2020-01-01,1.0\n3000-01-01,2.0\n")
    with pytest.raises(DataError) as error:
        load_series(str(path))
    assert str(path) in str(error.value)
    assert "'3000-01-01'" in str(error.value)
    early = tmp_path / "early.csv"
    early.write_text("Date,Close\n1500-01-01,1.0\n2020-01-01,2.0\n")
    with pytest.raises(DataError, match="1500-01-01"):
        load_series(str(early))


def test_dates_are_still_epoch_milliseconds_floored(tmp_path: Path) -> None:
    path = tmp_path / "ms.csv"
    path.write_text("Date,Close\n1969-12-31 23:59:59.9995,1.0\n2020-01-01 00:00:00.0000,2.0\n")
    (series,) = load_series(str(path))
    assert series.ts.tolist() == [-1, 1_577_836_800_000]


def test_replay_of_a_far_date_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "far.csv"
    path.write_text("Date,Close\n2020-01-01,1.0\n3000-01-01,2.0\n")
    assert main(["replay", "--data", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "3000-01-01" in err


# ---------------------------------------------------------------------------- F9 (b)
def test_device_error_names_a_missing_gpu_and_lets_auto_fall_back(no_gpu: None) -> None:
    assert device_error("auto") is None
    assert device_error("cpu") is None
    problem = device_error("cuda")
    assert problem is not None and "CUDA is not available" in problem
    assert device_error("cuda:1") is not None


def test_serve_on_cuda_without_a_gpu_exits_2(
    tmp_path: Path,
    no_gpu: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    make_checkpoint(tmp_path)
    monkeypatch.setenv("TICKCAST_DEVICE", "cuda")
    monkeypatch.setenv("TICKCAST_CHECKPOINT_DIR", str(tmp_path))
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("tickcast serve: ") and "CUDA is not available" in err


def test_bench_on_cuda_without_a_gpu_exits_2(
    no_gpu: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", "--device", "cuda", "--ceiling-only", "--quick"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("tickcast bench: ") and "CUDA is not available" in err


def test_bench_auto_device_falls_back_to_the_cpu_plan(no_gpu: None) -> None:
    args = build_parser().parse_args(["bench", "--device", "auto"])
    assert Plan.from_args(args).batch_sizes == BATCH_SIZES


def test_demo_on_cuda_without_a_gpu_exits_2_before_training(
    tmp_path: Path,
    no_gpu: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def no_training(*args: Any, **kwargs: Any) -> str:
        raise AssertionError("the demo trained a checkpoint for a device it cannot use")

    monkeypatch.setattr(demo, "ensure_checkpoint", no_training)
    monkeypatch.delenv("TICKCAST_DEVICE", raising=False)
    argv = ["demo", "--headless", "--device", "cuda", "--checkpoint-dir", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "CUDA is not available" in err


# ---------------------------------------------------------------------------- F10, F11
@pytest.mark.parametrize("rate", ["nan", "inf", "-inf", "0", "-3", "fast"])
def test_replay_rate_must_be_finite_and_positive(
    rate: str, capsys: pytest.CaptureFixture[str]
) -> None:
    line = usage_error(["replay", "--data", "x.csv", f"--rate={rate}"], capsys)
    assert "--rate" in line and "finite positive number or 'max'" in line


def test_replay_rate_accepts_a_number_or_max() -> None:
    parse = build_parser().parse_args
    assert parse(["replay", "--data", "x.csv", "--rate", "250"]).rate == 250.0
    assert parse(["replay", "--data", "x.csv", "--rate", "max"]).rate is None
    assert parse(["replay", "--data", "x.csv"]).rate is None


@pytest.mark.parametrize("rate", ["nan", "inf", "-inf", "0", "-1"])
def test_demo_rate_must_be_finite_and_positive(
    rate: str, capsys: pytest.CaptureFixture[str]
) -> None:
    line = usage_error(["demo", f"--rate={rate}"], capsys)
    assert "--rate" in line and "finite positive number" in line


def test_replay_limit_must_not_be_negative(capsys: pytest.CaptureFixture[str]) -> None:
    line = usage_error(["replay", "--data", "x.csv", "--limit", "-1"], capsys)
    assert "--limit" in line and "at least 0" in line
    assert build_parser().parse_args(["replay", "--data", "x.csv", "--limit", "0"]).limit == 0


# ---------------------------------------------------------------------------- F12
@pytest.fixture
def demo_must_not_run(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The demo's broker phase, replaced: records the window length it was given."""
    calls: list[int] = []

    async def fake_run(
        args: argparse.Namespace,
        console: Any,
        checkpoint_dir: Path,
        stream: Any,
        window: int,
        stop: Any,
    ) -> int:
        calls.append(window)
        return 0

    monkeypatch.setattr(demo, "_run", fake_run)
    monkeypatch.delenv("TICKCAST_DEVICE", raising=False)
    return calls


def test_demo_history_must_exceed_the_checkpoint_window(
    tmp_path: Path, demo_must_not_run: list[int], capsys: pytest.CaptureFixture[str]
) -> None:
    make_checkpoint(tmp_path, window_length=60)
    argv = ["demo", "--headless", "--history", "60", "--checkpoint-dir", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "--history must be greater than the model's window length (60), got 60" in err
    assert demo_must_not_run == []


def test_demo_history_is_checked_against_the_checkpoint_in_use(
    tmp_path: Path, prices_csv: Path, demo_must_not_run: list[int]
) -> None:
    make_checkpoint(tmp_path, window_length=8)
    argv = ["demo", "--headless", "--history", "10", "--checkpoint-dir", str(tmp_path)]
    assert main([*argv, "--data", str(prices_csv)]) == 0
    assert demo_must_not_run == [8]


def test_demo_history_is_checked_before_training_a_first_checkpoint(
    tmp_path: Path,
    demo_must_not_run: list[int],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def no_training(*args: Any, **kwargs: Any) -> str:
        raise AssertionError("trained a checkpoint whose window --history cannot fill")

    monkeypatch.setattr(demo, "ensure_checkpoint", no_training)
    argv = ["demo", "--headless", "--history", "30", "--checkpoint-dir", str(tmp_path / "none")]
    assert main(argv) == 2
    assert "window length (60), got 30" in capsys.readouterr().err


# ---------------------------------------------------------------------------- F15
def test_replay_to_an_unreachable_broker_is_one_line_and_exit_1(prices_csv: Path) -> None:
    (port,) = pick_free_ports(1)  # nothing listens there: the connection is refused
    done = subprocess.run(
        [
            sys.executable, "-m", "daemon.cli", "replay", "--data", str(prices_csv),
            "--bootstrap-servers", f"127.0.0.1:{port}", "--no-progress",
        ],
        capture_output=True, text=True, timeout=60, check=False, cwd=REPO_ROOT,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("tickcast replay: error: ")
    assert f"127.0.0.1:{port}" in lines[0] and lines[0].endswith("(0 ticks acknowledged)")
    assert done.stdout == ""


def test_replay_delivery_failure_mid_stream_is_one_line_and_exit_1(
    prices_csv: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import aiokafka

    from tests.unit.test_replay_restamp import FakeProducer

    class FailingProducer(FakeProducer):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(ok=2, capacity=3)

        async def start(self) -> None:
            return None

        async def stop(self) -> None:
            await asyncio.sleep(0)

    monkeypatch.setattr(aiokafka, "AIOKafkaProducer", FailingProducer)
    argv = ["replay", "--data", str(prices_csv), "--no-progress", "--input-topic", "t1"]
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert captured.err.startswith("tickcast replay: error: producing to t1 failed: ")
    assert captured.err.rstrip().endswith("(6 ticks acknowledged)")


# ------------------------------------------------- the module entry points = the CLI
def test_python_m_daemon_answers_bad_settings_like_tickcast_serve() -> None:
    env = {**os.environ, "TICKCAST_MAX_BATCH_SIZE": "0"}
    for entry in (["-m", "daemon"], ["-m", "daemon.cli", "serve"]):
        done = subprocess.run(
            [sys.executable, *entry],
            capture_output=True, text=True, timeout=60, check=False, cwd=REPO_ROOT, env=env,
        )  # fmt: skip
        assert done.returncode == 2, done.stderr
        assert done.stderr.startswith("tickcast serve: invalid settings:"), done.stderr
        assert "max_batch_size" in done.stderr and "Traceback" not in done.stderr


# Both retrain entry points, run_retrain replaced: one logs a line, one is interrupted.
RETRAIN_PROBE = """
import logging, sys
import model.retrain
def fake(args):
    logging.getLogger("model.retrain").info("promoted v1 to LATEST")
    if sys.argv[1] == "interrupt":
        raise KeyboardInterrupt
    return 0
model.retrain.run_retrain = fake
if sys.argv[2] == "tickcast":
    from daemon.cli import main
    sys.exit(main(["retrain", "--data", "dataset:goog"]))
from model.__main__ import main
sys.exit(main(["--data", "dataset:goog"]))
"""


@pytest.mark.parametrize("entry", ["tickcast", "python -m model"])
def test_both_retrain_entry_points_log_info_with_times_and_answer_ctrl_c(entry: str) -> None:
    def probe(mode: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", RETRAIN_PROBE, mode, entry.split()[0]],
            capture_output=True, text=True, timeout=120, check=False, cwd=REPO_ROOT,
        )  # fmt: skip

    done = probe("run")
    assert done.returncode == 0, done.stderr
    assert re.search(
        r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO model.retrain: promoted v1 to LATEST$",
        done.stderr,
        re.MULTILINE,
    ), done.stderr
    interrupted = probe("interrupt")
    assert interrupted.returncode == 130, interrupted.stderr
    assert "tickcast retrain: interrupted; nothing was promoted" in interrupted.stderr
    assert "Traceback" not in interrupted.stderr
