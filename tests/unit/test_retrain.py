"""The retrain job end to end on small real slices: report, checkpoint, picture, promotion."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

import model.walk_forward as fitting_module  # train_and_score: the one place that trains
from model.checkpoint import (
    LATEST_FILE,
    CheckpointMeta,
    load_checkpoint,
    new_version,
    promote,
    read_latest,
    save_checkpoint,
)
from model.data import ChronologicalSplit, chronological_split, load_series
from model.gru import ModelConfig, PriceGRU
from model.retrain import PLOT_FILE, decide_promotion, run_retrain
from model.train import TrainResult
from tests.support.retrain import FAST, WINDOW, parse


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    assert run_retrain(parse(*argv, "--json")) == 0
    report: dict[str, Any] = json.loads(capsys.readouterr().out)
    return report


def spoiled(model: PriceGRU) -> PriceGRU:
    """The same model with a residual correction that only adds error."""
    with torch.no_grad():
        model.head.bias.fill_(0.5)
    return model


def test_retrain_end_to_end(
    goog_csv: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TICKCAST_CHECKPOINT_DIR", str(tmp_path / "ck"))
    first = run_json(capsys, "--data", str(goog_csv), *FAST)
    version_dir = Path(first["checkpoint"])
    assert version_dir.parent == tmp_path / "ck"
    assert first["promoted"] is True
    assert first["reason"] == "no checkpoint in service yet"
    assert read_latest(tmp_path / "ck") == first["version"]
    assert Path(first["plot"]) == version_dir / PLOT_FILE
    assert (version_dir / PLOT_FILE).read_bytes()[:4] == b"\x89PNG"
    evaluation = first["evaluation"]
    assert evaluation["windows"] == first["windows"]["test"] == round((400 - WINDOW) * 0.15)
    assert evaluation["rmse_ratio"] == pytest.approx(
        evaluation["gru"]["rmse"] / evaluation["naive"]["rmse"]
    )

    meta = load_checkpoint(version_dir).meta
    assert meta.architecture.window_length == WINDOW
    assert meta.architecture.hidden_size == 8
    assert meta.parent_version is None
    (trained_on,) = meta.training_data
    assert trained_on.symbol == "GOOG"
    assert trained_on.rows == 400 - first["windows"]["test"]
    assert trained_on.end < meta.evaluation["test_data"][0]["start"]
    assert meta.evaluation["rmse_ratio"] == evaluation["rmse_ratio"]
    assert meta.evaluation["promotion"]["promoted"] is True

    # The same data and seed again: an equal model is "not worse", so it is promoted.
    second = run_json(capsys, "--data", str(goog_csv), *FAST)
    assert second["parent_version"] == first["version"]
    assert second["evaluation"] == first["evaluation"]
    assert second["promoted"] is True
    assert second["incumbent_rmse"] == pytest.approx(evaluation["gru"]["rmse"])
    assert second["window_length_change"] is None
    assert read_latest(tmp_path / "ck") == second["version"]


def test_text_report(goog_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = run_retrain(parse("--data", str(goog_csv), "--checkpoint-dir", str(tmp_path), *FAST))
    out = capsys.readouterr().out
    assert code == 0
    for text in ("GRU", "naive (next = last)", "RMSE ratio GRU / naive", "promoted to LATEST"):
        assert text in out
    assert str(tmp_path / read_latest(tmp_path) / PLOT_FILE) in out  # type: ignore[operator]


def test_a_worse_model_is_not_promoted_unless_forced(
    goog_csv: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ck = str(tmp_path)
    incumbent = run_json(capsys, "--data", str(goog_csv), "--checkpoint-dir", ck, *FAST)

    train_model = fitting_module.train_model

    def train_worse(*args: Any, **kwargs: Any) -> TrainResult:
        result = train_model(*args, **kwargs)
        spoiled(result.model)
        return result

    monkeypatch.setattr(fitting_module, "train_model", train_worse)
    worse = run_json(capsys, "--data", str(goog_csv), "--checkpoint-dir", ck, *FAST)
    assert worse["promoted"] is False
    assert worse["reason"].startswith("worse:")
    assert worse["evaluation"]["gru"]["rmse"] > worse["incumbent_rmse"]
    assert read_latest(tmp_path) == incumbent["version"]
    # Saved for inspection all the same, with its picture.
    assert (Path(worse["checkpoint"]) / PLOT_FILE).exists()

    forced = run_json(capsys, "--data", str(goog_csv), "--checkpoint-dir", ck, *FAST, "--force")
    assert forced["promoted"] is True
    assert read_latest(tmp_path) == forced["version"]

    # Back to honest training: better than the spoiled one in service, so promoted.
    monkeypatch.setattr(fitting_module, "train_model", train_model)
    better = run_json(capsys, "--data", str(goog_csv), "--checkpoint-dir", ck, *FAST)
    assert better["promoted"] is True
    assert better["reason"].startswith("not worse:")
    assert read_latest(tmp_path) == better["version"]


def test_promoting_another_window_length_warns_that_daemons_keep_the_old_model(
    goog_csv: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A serving daemon refuses a checkpoint of another window length (its windows hold that
    # many ticks), so such a promotion takes effect only as instances restart.
    caplog.set_level(logging.WARNING, logger="model.retrain")
    served = install(tmp_path, PriceGRU(ModelConfig(hidden_size=8, window_length=WINDOW + 5)))
    argv = ["--data", str(goog_csv), "--checkpoint-dir", str(tmp_path), *FAST, "--force"]
    report = run_json(capsys, *argv)
    assert report["promoted"] is True
    assert report["window_length_change"] == [WINDOW + 5, WINDOW]
    assert f"{served} in service used {WINDOW + 5}" in caplog.text
    assert "until they are restarted" in caplog.text

    assert run_retrain(parse(*argv)) == 0  # now the same length: no change to report
    assert "window length" not in capsys.readouterr().out
    install(tmp_path, PriceGRU(ModelConfig(hidden_size=8, window_length=WINDOW + 5)))
    assert run_retrain(parse(*argv)) == 0
    assert f"window length {WINDOW + 5} -> {WINDOW}" in capsys.readouterr().out


@pytest.fixture(scope="module")
def goog_split() -> ChronologicalSplit:
    return chronological_split(load_series("dataset:goog")[0], window_length=WINDOW)


def install(root: Path, model: PriceGRU) -> str:
    version = new_version()
    save_checkpoint(root, model, CheckpointMeta(version=version, architecture=model.config))
    promote(root, version)
    return version


def naive_times(split: ChronologicalSplit, factor: float) -> np.ndarray:
    """Predictions whose every error is ``factor`` times the naive forecast's."""
    return split.test.targets + factor * (split.test.last - split.test.targets)


def test_decide_promotion_rule(tmp_path: Path, goog_split: ChronologicalSplit) -> None:
    test = goog_split.test
    naive_rmse = float(np.sqrt(np.mean((test.last - test.targets) ** 2)))
    # The untrained residual model is the naive forecast.
    version = install(tmp_path, PriceGRU(ModelConfig(hidden_size=8, window_length=WINDOW)))
    worse = decide_promotion(tmp_path, goog_split, naive_times(goog_split, 1.01))
    assert (worse.promote, worse.incumbent_version) == (False, version)
    assert worse.incumbent_rmse == pytest.approx(naive_rmse, rel=1e-6)
    assert worse.candidate_rmse == pytest.approx(naive_rmse * 1.01)
    assert worse.compared_windows == len(test)
    assert decide_promotion(tmp_path, goog_split, naive_times(goog_split, 0.99)).promote
    forced = decide_promotion(tmp_path, goog_split, naive_times(goog_split, 1.01), force=True)
    assert forced.promote


def test_broken_incumbent_promotes_with_a_warning(
    tmp_path: Path, goog_split: ChronologicalSplit, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="model.retrain")
    version = install(tmp_path, PriceGRU(ModelConfig(hidden_size=8, window_length=WINDOW)))
    (tmp_path / version / "model.safetensors").write_bytes(b"garbage")
    decision = decide_promotion(tmp_path, goog_split, naive_times(goog_split, 100.0))
    assert decision.promote
    assert "cannot be loaded" in decision.reason
    assert "cannot be loaded" in caplog.text


@pytest.mark.parametrize(
    ("make_spec", "message"),
    [
        (lambda tmp: str(tmp / "missing.csv"), "does not exist"),
        (
            lambda tmp: "dataset:ftse",
            "unknown dataset 'dataset:ftse'; known data sets: dataset:nasdaq",
        ),
        ("nan", "NaN"),
        ("short", f"needs at least {WINDOW + 3}"),
    ],
    ids=["missing-file", "unknown-dataset", "nan-prices", "too-few-rows"],
)
def test_bad_input_exits_2_with_a_clear_message(
    goog_csv: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    make_spec: Any,
    message: str,
) -> None:
    if make_spec == "nan":
        frame = pd.read_csv(goog_csv)
        frame.loc[10, "Close"] = np.nan
        frame.to_csv(tmp_path / "gaps.csv", index=False)
        spec = str(tmp_path / "gaps.csv")
    elif make_spec == "short":
        pd.read_csv(goog_csv).iloc[: WINDOW + 2].to_csv(tmp_path / "short.csv", index=False)
        spec = str(tmp_path / "short.csv")
    else:
        spec = make_spec(tmp_path)
    code = run_retrain(parse("--data", spec, "--checkpoint-dir", str(tmp_path / "ck"), *FAST))
    captured = capsys.readouterr()
    assert code == 2
    assert message in captured.err
    assert captured.err.startswith("tickcast retrain: error: ")
    assert "Traceback" not in captured.err
    assert captured.out == ""
    assert not (tmp_path / "ck" / LATEST_FILE).exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--epochs", "0"], "--epochs"),
        (["--device", "tpu"], "device 'tpu'"),
        (["--val-fraction", "0.7"], "--val-fraction must lie strictly between 0 and 0.5"),
    ],
)
def test_invalid_setting_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    args = parse("--data", "dataset:goog", "--checkpoint-dir", str(tmp_path), *flags)
    assert run_retrain(args) == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_python_dash_m_model_missing_file(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "model",
            "--data",
            str(tmp_path / "QQQ.csv"),
            "--checkpoint-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2
    assert f"price file {tmp_path / 'QQQ.csv'} does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_from_kafka_walk_forward_skips_symbols_too_short_for_the_folds(
    monkeypatch: pytest.MonkeyPatch, goog: Any
) -> None:
    """A symbol that just appeared on the topic has enough ticks for one split but not for
    K folds: it is left out (logged), instead of failing the run for every symbol."""
    import model.retrain as retrain_module
    from model.data import PriceSeries
    from model.kafka_source import KafkaTicks

    newcomer = PriceSeries("NEW", "kafka:ticks", goog.ts[: WINDOW + 3], goog.prices[: WINDOW + 3])
    full = PriceSeries("GOOG", "kafka:ticks", goog.ts, goog.prices)

    def fake_load(*_args: Any, **_kwargs: Any) -> KafkaTicks:
        return KafkaTicks(topic="ticks", series=[full, newcomer])

    monkeypatch.setattr(retrain_module, "load_kafka_series", fake_load)
    args = parse("--from-kafka", "--walk-forward", "3", *FAST)
    assert [s.symbol for s in retrain_module.kafka_training_data(args, WINDOW)] == ["GOOG"]
    single = parse("--from-kafka", *FAST)  # one split: both are long enough
    assert len(retrain_module.kafka_training_data(single, WINDOW)) == 2


@pytest.mark.parametrize(
    ("flags", "expected"),
    [((), 1_000_000), (("--max-ticks", "500"), 500), (("--max-ticks", "0"), None)],
)
def test_from_kafka_reads_at_most_max_ticks(
    monkeypatch: pytest.MonkeyPatch, goog: Any, flags: tuple[str, ...], expected: int | None
) -> None:
    """--max-ticks reaches the read: a default limit, a given one, or none for 0."""
    import model.retrain as retrain_module
    from model.data import PriceSeries
    from model.kafka_source import KafkaTicks

    asked: list[int | None] = []

    def fake_load(*_args: Any, max_records: int | None, **_kwargs: Any) -> KafkaTicks:
        asked.append(max_records)
        return KafkaTicks(topic="ticks", series=[PriceSeries("GOOG", "k", goog.ts, goog.prices)])

    monkeypatch.setattr(retrain_module, "load_kafka_series", fake_load)
    retrain_module.kafka_training_data(parse("--from-kafka", *flags, *FAST), WINDOW)
    assert asked == [expected]
    assert retrain_module.DEFAULT_MAX_TICKS == 1_000_000


def test_max_train_time_reaches_the_training_config() -> None:
    from model.retrain import _configs

    _, limited = _configs(parse("--data", "dataset:goog", "--max-train-time", "20m", *FAST))
    assert limited.max_seconds == 1200.0
    _, unlimited = _configs(parse("--data", "dataset:goog", *FAST))
    assert unlimited.max_seconds is None
    with pytest.raises(SystemExit):
        parse("--data", "dataset:goog", "--max-train-time", "soon")


def nasdaq_csv(path: Path, start: str, stop: str) -> Path:
    """Real NASDAQ closes between two dates, in the seed's Date/Close layout."""
    import arch.data.nasdaq

    frame = arch.data.nasdaq.load().loc[start:stop].reset_index()
    frame["Date"] = frame["Date"].dt.strftime("%Y-%m-%d")
    frame.to_csv(path, index=False)
    return path


def test_a_common_time_split_from_the_command_line(
    goog_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """GOOG's last 400 bars (2011-08 to 2013-03) and NASDAQ 2010-01 to 2012-12: with
    --split time no series' fitted data reaches past another's first test target, and
    meta.json says how the data was split; a series outside the test period is refused."""
    nasdaq = nasdaq_csv(tmp_path / "nasdaq.csv", "2010-01-01", "2012-12-31")
    common = ["--data", str(goog_csv), "--data", str(nasdaq), "--split", "time", *FAST]
    report = run_json(capsys, *common, "--checkpoint-dir", str(tmp_path / "ck"))
    assert report["split_by"] == "time" and len(report["series"]) == 2
    meta = load_checkpoint(Path(report["checkpoint"])).meta
    assert meta.evaluation["split_by"] == "time"
    fitted_until = max(pd.Timestamp(r.end) for r in meta.training_data)
    tested_from = min(pd.Timestamp(r["start"]) for r in meta.evaluation["test_data"])
    assert fitted_until < tested_from

    old = nasdaq_csv(tmp_path / "old.csv", "2005-01-01", "2009-12-31")
    argv = ["--data", str(goog_csv), "--data", str(old), "--split", "time", *FAST]
    assert run_retrain(parse(*argv, "--checkpoint-dir", str(tmp_path / "ck2"))) == 2
    err = capsys.readouterr().err
    assert "(GOOG) has no training target in the common time split" in err
    assert "Traceback" not in err


def test_from_kafka_common_time_split_leaves_out_symbols_outside_a_period(
    monkeypatch: pytest.MonkeyPatch,
    goog: Any,
    nasdaq: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """One stream, three symbols with their real dates: GOOG ticks throughout (its last 600
    days), one symbol stopped ticking early (NASDAQ's first rows of that span) and one
    joined near the end (NASDAQ's last rows before GOOG's end). At the common times the
    first has no test target and the second no training target: with --from-kafka both
    are left out, and the run trains on GOOG."""
    import model.retrain as retrain_module
    from model.data import PriceSeries
    from model.kafka_source import KafkaTicks

    start, end = int(goog.ts[-600]), int(goog.ts[-1])
    early = np.flatnonzero(nasdaq.ts >= start)[:150]
    late = np.flatnonzero(nasdaq.ts <= end)[-90:]
    streams = [
        PriceSeries("GOOG", "kafka:ticks", goog.ts[-600:], goog.prices[-600:]),
        PriceSeries("GONE", "kafka:ticks", nasdaq.ts[early], nasdaq.prices[early]),
        PriceSeries("NEW", "kafka:ticks", nasdaq.ts[late], nasdaq.prices[late]),
    ]

    def fake_load(*_args: Any, **_kwargs: Any) -> KafkaTicks:
        return KafkaTicks(topic="ticks", series=streams)

    monkeypatch.setattr(retrain_module, "load_kafka_series", fake_load)
    flags = ["--from-kafka", "--split", "time", "--checkpoint-dir", str(tmp_path), *FAST]
    assert run_json(capsys, *flags)["series"] == ["GOOG"]
