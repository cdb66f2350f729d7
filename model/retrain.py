"""The retrain job: ``tickcast retrain`` / ``python -m model``.

Load → split in time → train → evaluate on the held-out test split against the naive
forecast → save a checkpoint (with ``predictions.png`` beside it) → promote it to
``LATEST`` only if it is not worse than the checkpoint in service on the same test windows.
The three stages are separate functions (:func:`load_training_data`,
:func:`fit_and_evaluate`, :func:`decide_promotion`) so that other data sources and
walk-forward evaluation can reuse them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError

from model.checkpoint import (
    CheckpointError,
    CheckpointMeta,
    DataRange,
    load_latest,
    new_version,
    promote,
    read_latest,
    save_checkpoint,
)
from model.data import (
    ChronologicalSplit,
    DataError,
    PriceSeries,
    SeriesCut,
    chronological_split,
    load_many,
)
from model.evaluate import plot_predictions, predict_windows, rmse_ratio
from model.gru import ModelConfig
from model.kafka_access import KafkaAccess
from model.kafka_source import load_kafka_series, parse_duration, parse_since
from model.train import TrainConfig, TrainResult, resolve_device
from model.walk_forward import (
    DEFAULT_EVAL_FRACTION,
    WalkForwardResult,
    format_walk_forward,
    run_walk_forward,
    train_and_score,
)

logger = logging.getLogger(__name__)

CHECKPOINT_DIR_ENV = "TICKCAST_CHECKPOINT_DIR"
DEFAULT_CHECKPOINT_DIR = "./checkpoints"
PLOT_FILE = "predictions.png"
EXIT_USAGE = 2  # bad input: missing file, unknown data set, NaN prices, too few rows
EXIT_FAILURE = 1
# The loss the retrain job trains with unless --loss says otherwise: it beat "scaled" on the
# development walk-forward (README.md, "Model quality").
RETRAIN_LOSS = "relative"


@dataclass(frozen=True)
class FitOutcome:
    """One model trained on a split and scored on its held-out test windows."""

    split: ChronologicalSplit
    training: TrainResult
    test_predicted: np.ndarray
    evaluation: dict[str, Any]  # evaluate_forecasts() on the test split

    @property
    def rmse(self) -> float:
        return float(self.evaluation["gru"]["rmse"])


@dataclass(frozen=True)
class PromotionDecision:
    promote: bool
    reason: str
    incumbent_version: str | None = None
    incumbent_rmse: float | None = None


def load_training_data(specs: list[str]) -> list[PriceSeries]:
    """The series to train on; :class:`DataError` if any spec is unusable."""
    series = load_many(specs)
    for one in series:
        logger.info("loaded %s from %s: %d rows", one.symbol, one.source, len(one))
    return series


def fit_and_evaluate(
    series: list[PriceSeries],
    model_config: ModelConfig,
    train_config: TrainConfig,
    *,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    progress: bool = True,
) -> FitOutcome:
    """Split chronologically, train on train (early-stopping on val), score on test."""
    split = chronological_split(series, val_fraction, test_fraction, model_config.window_length)
    logger.info(
        "windows: %d train, %d validation, %d test (window length %d, %d series)",
        len(split.train),
        len(split.val),
        len(split.test),
        split.window_length,
        len(split.cuts),
    )
    training, predicted, evaluation = train_and_score(
        split, model_config, train_config, progress=progress
    )
    return FitOutcome(split, training, predicted, evaluation)


def decide_promotion(
    checkpoint_dir: Path,
    candidate_rmse: float,
    test_windows: np.ndarray,
    test_targets: np.ndarray,
    *,
    force: bool = False,
    device: torch.device | str = "cpu",
) -> PromotionDecision:
    """Promote unless the checkpoint in service does better on the same test windows.

    Ties promote (the newer data wins). No checkpoint in service, one that cannot be
    loaded, or one with another window length (so it cannot be scored on these windows)
    promotes with a warning. ``force`` promotes regardless.
    """
    if force:
        return PromotionDecision(True, "--force given")
    if read_latest(checkpoint_dir) is None:
        return PromotionDecision(True, "no checkpoint in service yet")
    try:
        incumbent = load_latest(checkpoint_dir, device)
    except CheckpointError as exc:
        logger.warning("the checkpoint in service cannot be loaded; promoting anyway: %s", exc)
        return PromotionDecision(True, f"checkpoint in service cannot be loaded ({exc})")
    window_length = test_windows.shape[1]
    if incumbent.meta.window_length != window_length:
        logger.warning(
            "checkpoint in service %s has window length %d, not %d: it cannot be scored on "
            "the same test windows; promoting anyway",
            incumbent.version,
            incumbent.meta.window_length,
            window_length,
        )
        return PromotionDecision(
            True,
            f"checkpoint in service {incumbent.version} has window length "
            f"{incumbent.meta.window_length}, not {window_length}; not comparable",
            incumbent.version,
        )
    predicted = predict_windows(incumbent.model, test_windows)
    incumbent_rmse = float(np.sqrt(np.mean((predicted - test_targets) ** 2)))
    comparison = (
        f"RMSE {candidate_rmse:.6g} vs {incumbent_rmse:.6g} for {incumbent.version} in "
        f"service, on the same {len(test_targets)} test windows"
    )
    if candidate_rmse <= incumbent_rmse:
        return PromotionDecision(
            True, f"not worse: {comparison}", incumbent.version, incumbent_rmse
        )
    return PromotionDecision(False, f"worse: {comparison}", incumbent.version, incumbent_rmse)


def _row_range(cut: SeriesCut, start: int, stop: int) -> DataRange:
    first, last = cut.series.iso_range(start, stop)
    return DataRange(
        source=cut.series.source,
        symbol=cut.series.symbol,
        start=first,
        end=last,
        rows=stop - start,
    )


def training_ranges(split: ChronologicalSplit) -> list[DataRange]:
    """Per series, the rows used for fitting (training and validation): a prefix."""
    return [_row_range(cut, 0, cut.fit_rows) for cut in split.cuts]


def held_out_ranges(split: ChronologicalSplit) -> list[DataRange]:
    """Per series, the test targets' rows (their windows reach back into earlier rows)."""
    return [_row_range(cut, len(cut.series) - cut.test, len(cut.series)) for cut in split.cuts]


# --------------------------------------------------------------------------- CLI


def add_retrain_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the retrain flags to ``parser`` (``tickcast retrain`` and ``python -m model``)."""
    model_defaults = ModelConfig()
    train_defaults = TrainConfig()
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--data",
        action="append",
        metavar="SPEC",
        help="a CSV/Parquet file (Date,Close or symbol,ts,price) or dataset:NAME "
        "(nasdaq, sp500, goog, eurusd, btcusd); repeat to train one model on several",
    )
    source.add_argument(
        "--from-kafka",
        action="store_true",
        help="train on the ticks retained in the input topic (the daemon's own stream)",
    )
    kafka = parser.add_argument_group(
        "--from-kafka",
        "security as for the daemon: $TICKCAST_SECURITY_PROTOCOL, $TICKCAST_SASL_MECHANISM, "
        "$TICKCAST_SASL_USERNAME, $TICKCAST_SASL_PASSWORD, $TICKCAST_SSL_CAFILE",
    )
    kafka.add_argument(
        "--bootstrap-servers", help="default: $TICKCAST_BOOTSTRAP_SERVERS, else localhost:9092"
    )
    kafka.add_argument("--input-topic", help="default: $TICKCAST_INPUT_TOPIC, else ticks")
    kafka.add_argument(
        "--since",
        type=_since_arg,
        metavar="WHEN",
        help="only records written since WHEN: a duration back from each run (7d, 12h) or "
        "an ISO time (2024-05-01T00:00Z); by Kafka record timestamp",
    )
    parser.add_argument(
        "--every",
        type=parse_duration,
        metavar="DURATION",
        help="keep running: retrain, promote if not worse, sleep DURATION (1h, 30m, 90s), "
        "repeat; SIGTERM stops it between runs",
    )
    parser.add_argument(
        "--checkpoint-dir",
        type=Path,
        default=None,
        help=f"where checkpoints live (default: ${CHECKPOINT_DIR_ENV}, else "
        f"{DEFAULT_CHECKPOINT_DIR})",
    )
    parser.add_argument(
        "--epochs", type=int, help=f"at most this many (default {train_defaults.epochs})"
    )
    parser.add_argument(
        "--patience", type=int, help=f"early stopping (default {train_defaults.patience})"
    )
    parser.add_argument("--seed", type=int, help=f"default {train_defaults.seed}")
    parser.add_argument("--batch-size", type=int, help=f"default {train_defaults.batch_size}")
    parser.add_argument(
        "--lr", type=float, help=f"Adam learning rate (default {train_defaults.lr})"
    )
    parser.add_argument("--hidden-size", type=int, help=f"default {model_defaults.hidden_size}")
    parser.add_argument(
        "--loss",
        choices=("scaled", "relative"),
        default=RETRAIN_LOSS,
        help="training loss: MSE of per-window-scaled prices, or weighted by (span / last "
        f"price)^2 so it tracks the price error (default {RETRAIN_LOSS}; see "
        "README.md, 'Model quality')",
    )
    parser.add_argument(
        "--window-length",
        type=int,
        help=f"prices per window (default {model_defaults.window_length})",
    )
    parser.add_argument("--val-fraction", type=float, default=0.15, help="default 0.15")
    parser.add_argument("--test-fraction", type=float, default=0.15, help="default 0.15")
    parser.add_argument(
        "--walk-forward",
        type=int,
        metavar="K",
        help="evaluate on K successive walk-forward folds instead of one split: the newest "
        "--walk-forward-span of each series is tested in K blocks, each by a model trained "
        "only on what came before (validation = the newest --val-fraction of that); the "
        "last fold's model is the candidate, gated on the last fold's test windows",
    )
    parser.add_argument(
        "--walk-forward-span",
        type=float,
        default=DEFAULT_EVAL_FRACTION,
        help=f"share of each series tested by the walk-forward folds (default "
        f"{DEFAULT_EVAL_FRACTION})",
    )
    parser.add_argument(
        "--walk-forward-scheme",
        choices=("expanding", "rolling"),
        default="expanding",
        help="fit each fold on everything before its test block (expanding, default) or "
        "on a fixed-length span just before it (rolling)",
    )
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument(
        "--force",
        action="store_true",
        help="promote to LATEST even if worse than the one in service",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def _given(args: argparse.Namespace, mapping: dict[str, str]) -> dict[str, Any]:
    return {
        field: getattr(args, flag)
        for flag, field in mapping.items()
        if getattr(args, flag, None) is not None
    }


def _configs(args: argparse.Namespace) -> tuple[ModelConfig, TrainConfig]:
    model_config = ModelConfig(
        **_given(args, {"hidden_size": "hidden_size", "window_length": "window_length"})
    )
    train_config = TrainConfig(
        **_given(
            args,
            {
                "epochs": "epochs",
                "patience": "patience",
                "seed": "seed",
                "batch_size": "batch_size",
                "lr": "lr",
                "loss": "loss",
                "device": "device",
            },
        )
    )
    return model_config, train_config


def _fail(message: str, code: int = EXIT_USAGE) -> int:
    print(f"tickcast retrain: error: {message}", file=sys.stderr)
    return code


def _since_arg(text: str) -> str:
    """argparse type for --since: validated now, resolved at each run (``7d`` moves on)."""
    try:
        parse_since(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return text


def kafka_training_data(args: argparse.Namespace, window_length: int) -> list[PriceSeries]:
    """--from-kafka: the ticks retained in the input topic, one series per symbol."""
    flags = {"bootstrap_servers": args.bootstrap_servers, "input_topic": args.input_topic}
    try:
        access = KafkaAccess(**{name: value for name, value in flags.items() if value})
    except ValidationError as exc:
        problems = "; ".join(
            f"TICKCAST_{'_'.join(str(p) for p in e['loc']).upper()}: {e['msg']}"
            for e in exc.errors()
        )
        raise DataError(f"invalid Kafka setting: {problems}") from exc
    since_ms = parse_since(args.since) if args.since else None
    # chronological_split needs a window, a next price, and one row each for val and test.
    ticks = load_kafka_series(access, min_ticks=window_length + 3, since_ms=since_ms)
    logger.info("training data from %s: %s", access.input_topic, json.dumps(ticks.summary()))
    return ticks.series


class _StopBetweenRuns:
    """SIGTERM/SIGINT: finish the current run, then stop; a second signal stops at once."""

    def __init__(self) -> None:
        self.requested = threading.Event()
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopBetweenRuns:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *_: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, _frame: object) -> None:
        if self.requested.is_set():
            raise KeyboardInterrupt  # the second signal: do not wait for the run to end
        self.requested.set()
        logger.info("%s: stopping after the current run", signal.Signals(signum).name)


def run_retrain(args: argparse.Namespace) -> int:
    """Run the retrain job for parsed ``args`` (once, or every ``--every``); exit code."""
    every = getattr(args, "every", None)
    if every is None:
        return retrain_once(args)
    runs = 0
    with _StopBetweenRuns() as stop:
        while not stop.requested.is_set():
            runs += 1
            code = retrain_once(args)
            if code != 0:
                # A scheduler outlives one bad run (a topic still filling, a broker restart).
                logger.warning("retrain run %d failed with exit code %d", runs, code)
            logger.info("retrain run %d done; next in %s", runs, every)
            stop.requested.wait(every.total_seconds())
    logger.info("retrain scheduler stopped after %d runs", runs)
    return 0


def retrain_once(args: argparse.Namespace) -> int:
    """One retrain: load, train, evaluate, save, promote if not worse; the exit code."""
    started = time.perf_counter()
    checkpoint_dir = Path(
        args.checkpoint_dir or os.environ.get(CHECKPOINT_DIR_ENV) or DEFAULT_CHECKPOINT_DIR
    )
    try:
        model_config, train_config = _configs(args)
        device = resolve_device(train_config.device)
    except ValidationError as exc:
        problems = "; ".join(
            f"--{'-'.join(str(p) for p in e['loc']).replace('_', '-')}: {e['msg']}"
            for e in exc.errors()
        )
        return _fail(f"invalid setting: {problems}")
    except ValueError as exc:
        return _fail(str(exc))
    for flag, fraction in (
        ("--val-fraction", args.val_fraction),
        ("--test-fraction", args.test_fraction),
    ):
        if not 0 < fraction < 0.5:
            return _fail(f"{flag} must lie strictly between 0 and 0.5, got {fraction}")
    folds = getattr(args, "walk_forward", None)
    if folds is not None and folds < 1:
        return _fail(f"--walk-forward must be at least 1, got {folds}")
    if folds is not None and not 0 < args.walk_forward_span < 1:
        return _fail(
            f"--walk-forward-span must lie strictly between 0 and 1, got {args.walk_forward_span}"
        )
    try:
        series = (
            kafka_training_data(args, model_config.window_length)
            if args.from_kafka
            else load_training_data(args.data)
        )
        parent = read_latest(checkpoint_dir)
        walk: WalkForwardResult | None = None
        if folds is not None:
            # The promotion gate below then scores candidate and LATEST on the same
            # windows: the last fold's test block, which the candidate never trained on.
            walk = run_walk_forward(
                series,
                folds,
                model_config,
                train_config,
                eval_fraction=args.walk_forward_span,
                val_fraction=args.val_fraction,
                scheme=args.walk_forward_scheme,
                progress=not args.no_progress,
            )
            final = walk.final
            outcome = FitOutcome(
                final.split, final.training, final.test_predicted, final.evaluation
            )
        else:
            outcome = fit_and_evaluate(
                series,
                model_config,
                train_config,
                val_fraction=args.val_fraction,
                test_fraction=args.test_fraction,
                progress=not args.no_progress,
            )
    except DataError as exc:
        return _fail(str(exc))

    test = outcome.split.test
    decision = decide_promotion(
        checkpoint_dir, outcome.rmse, test.windows, test.targets, force=args.force, device=device
    )
    training = outcome.training
    meta = CheckpointMeta(
        version=new_version(),
        architecture=model_config,
        training_data=training_ranges(outcome.split),
        evaluation={
            "rmse_ratio": outcome.evaluation["rmse_ratio"],
            "test": outcome.evaluation,
            "test_data": [r.model_dump() for r in held_out_ranges(outcome.split)],
            "windows": {
                "train": len(outcome.split.train),
                "val": len(outcome.split.val),
                "test": len(test),
            },
            "training": {
                "best_epoch": training.best_epoch,
                "epochs_run": len(training.history) - 1,
                "best_val_loss": training.best_val_loss,
                "untrained_val_loss": training.history[0].val_loss,
                "seconds": round(training.seconds, 3),
                "device": training.device,
                "config": train_config.model_dump(),
            },
            "promotion": {
                "promoted": decision.promote,
                "reason": decision.reason,
                "incumbent_version": decision.incumbent_version,
                "incumbent_rmse": decision.incumbent_rmse,
            },
            "walk_forward": walk.summary if walk is not None else None,
        },
        parent_version=parent,
    )
    try:
        version_dir = save_checkpoint(checkpoint_dir, training.model, meta)
        plot_path = _plot(version_dir / PLOT_FILE, outcome)
        if decision.promote:
            promote(checkpoint_dir, meta.version)
    except (CheckpointError, OSError) as exc:
        return _fail(f"could not write the checkpoint: {exc}", EXIT_FAILURE)
    if decision.promote:
        logger.info("promoted %s to LATEST: %s", meta.version, decision.reason)
    else:
        logger.warning("kept %s out of service: %s", meta.version, decision.reason)

    report = {
        "version": meta.version,
        "checkpoint": str(version_dir),
        "plot": str(plot_path),
        "promoted": decision.promote,
        "reason": decision.reason,
        "parent_version": parent,
        "incumbent_rmse": decision.incumbent_rmse,
        "evaluation": outcome.evaluation,
        "windows": meta.evaluation["windows"],
        "training": meta.evaluation["training"],
        "walk_forward": meta.evaluation["walk_forward"],
        "seconds": round(time.perf_counter() - started, 3),
    }
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def _plot(path: Path, outcome: FitOutcome) -> Path:
    # One series only: a line through the end of one symbol and the start of the next
    # would be meaningless.
    first = outcome.split.test.series_index == 0
    symbol = outcome.split.cuts[0].series.symbol
    ratio = rmse_ratio(
        float(
            np.sqrt(
                np.mean((outcome.test_predicted[first] - outcome.split.test.targets[first]) ** 2)
            )
        ),
        float(
            np.sqrt(
                np.mean((outcome.split.test.last[first] - outcome.split.test.targets[first]) ** 2)
            )
        ),
    )
    return plot_predictions(
        path,
        outcome.split.test.targets[first],
        outcome.test_predicted[first],
        title=f"{symbol}: GRU next-price predictions vs actual (test RMSE / naive = {ratio:.4f})",
        ts=outcome.split.test.target_ts[first],
    )


def _fmt(value: float | None, digits: int = 6) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}"


def format_report(report: dict[str, Any]) -> str:
    """The human-readable report of one retrain."""
    evaluation = report["evaluation"]
    windows = report["windows"]
    training = report["training"]
    rows = [
        f"tickcast retrain: {report['version']} "
        f"({windows['train']} train / {windows['val']} val / {windows['test']} test windows; "
        f"{training['epochs_run']} epochs, best {training['best_epoch']}, on {training['device']}; "
        f"{report['seconds']:.1f} s)",
        f"held-out test, {evaluation['windows']} windows:",
        f"  {'':<22}{'RMSE':>12}{'MAE':>12}{'MAPE %':>10}{'direction':>11}",
    ]
    for name, label in (("gru", "GRU"), ("naive", "naive (next = last)")):
        figures = evaluation[name]
        direction = figures["directional_accuracy"]
        rows.append(
            f"  {label:<22}{_fmt(figures['rmse']):>12}{_fmt(figures['mae']):>12}"
            f"{figures['mape']:>10.4f}{'n/a' if direction is None else f'{direction:.3f}':>11}"
        )
    rows.append(f"  RMSE ratio GRU / naive: {evaluation['rmse_ratio']:.4f}")
    walk = report.get("walk_forward")
    if walk:
        rows[1] = f"held-out test of the last walk-forward fold, {evaluation['windows']} windows:"
        rows.append(format_walk_forward(walk))
    status = "promoted to LATEST" if report["promoted"] else "NOT promoted"
    rows.append(f"{status}: {report['reason']}")
    rows.append(f"checkpoint: {report['checkpoint']}")
    rows.append(f"plot: {report['plot']}")
    return "\n".join(rows)
