"""Forecast quality against the naive forecast (next price = last price), and the picture.

Figures, each for the GRU and for the naive forecast, over the same windows:

- ``rmse`` and ``mae`` in price units;
- ``mape`` in percent of the actual price;
- ``directional_accuracy``: the share of windows where ``sign(predicted - last)`` equals
  ``sign(actual - last)``. Windows where the actual price did not move have no direction
  and are left out (their count is ``flat_windows``). A forecast of *no move* when the
  price did move counts as a miss, so the naive forecast scores 0 by construction: it never
  calls a direction. A forecast within :data:`DIRECTION_TOLERANCE` of the last price calls
  no move: float32 arithmetic alone moves a "no change" forecast by ~1e-8 of the price,
  and those would otherwise count as coin-flip calls. ``None`` when every window is flat.

The headline is ``rmse_ratio`` = RMSE(GRU) / RMSE(naive): below 1 beats the naive
forecast, which on liquid prices is very hard to beat.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn

from model.gru import predict_prices

# Windows per forward pass: see model.train.EVAL_BATCH_SIZE.
PREDICT_BATCH_SIZE = 1024
# Relative to the last price: below it a forecast calls no direction (see the module doc).
DIRECTION_TOLERANCE = 1e-6
# Windows a series needs to enter a pooled, per-series-scaled figure (naive_scale).
MIN_SCALED_WINDOWS = 10


def predict_windows(
    model: nn.Module, windows: np.ndarray, batch_size: int = PREDICT_BATCH_SIZE
) -> np.ndarray:
    """Next-price predictions (float64) for [n, window] price windows, in bounded batches."""
    if len(windows) == 0:
        return np.empty(0)
    model.eval()
    parts = [
        predict_prices(model, windows[start : start + batch_size]).cpu().numpy()
        for start in range(0, len(windows), batch_size)
    ]
    return np.concatenate(parts)


def forecast_errors(actual: np.ndarray, predicted: np.ndarray, last: np.ndarray) -> dict[str, Any]:
    """RMSE, MAE, MAPE (%) and directional accuracy of one forecast; see the module doc."""
    error = predicted - actual
    moved = np.sign(actual - last)
    change = predicted - last
    called = np.where(np.abs(change) > DIRECTION_TOLERANCE * np.abs(last), np.sign(change), 0.0)
    directional = moved != 0
    hits = int(np.sum(called[directional] == moved[directional]))
    n_directional = int(directional.sum())
    return {
        "rmse": float(np.sqrt(np.mean(error**2))),
        "mae": float(np.mean(np.abs(error))),
        "mape": float(np.mean(np.abs(error) / np.abs(actual)) * 100.0),
        "directional_accuracy": hits / n_directional if n_directional else None,
    }


def evaluate_forecasts(
    actual: np.ndarray, predicted: np.ndarray, last: np.ndarray
) -> dict[str, Any]:
    """Compare a forecast with the naive one on the same windows.

    ``actual``: the true next prices; ``predicted``: the model's; ``last``: each window's
    newest price (the naive forecast). Returns ``{"windows", "flat_windows", "gru",
    "naive", "rmse_ratio"}`` with plain floats, ready for JSON.
    """
    actual, predicted, last = (np.asarray(a, dtype=np.float64) for a in (actual, predicted, last))
    if not actual.shape == predicted.shape == last.shape or actual.ndim != 1:
        raise ValueError(
            f"actual, predicted and last must be 1-D of one length, got shapes "
            f"{actual.shape}, {predicted.shape}, {last.shape}"
        )
    if len(actual) == 0:
        raise ValueError("no forecasts to evaluate")
    gru = forecast_errors(actual, predicted, last)
    naive = forecast_errors(actual, last, last)
    return {
        "windows": len(actual),
        "flat_windows": int(np.sum(actual == last)),
        "gru": gru,
        "naive": naive,
        "rmse_ratio": rmse_ratio(gru["rmse"], naive["rmse"]),
    }


def rmse_ratio(model_rmse: float, naive_rmse: float) -> float:
    if naive_rmse > 0:
        return model_rmse / naive_rmse
    return 1.0 if model_rmse == 0 else math.inf


def evaluate_model(model: nn.Module, windows: np.ndarray, targets: np.ndarray) -> dict[str, Any]:
    """:func:`evaluate_forecasts` of ``model`` on [n, window] windows and their next prices."""
    predicted = predict_windows(model, windows)
    return evaluate_forecasts(targets, predicted, windows[:, -1])


def plot_predictions(
    path: Path | str,
    actual: np.ndarray,
    predicted: np.ndarray,
    last_n: int = 200,
    *,
    title: str | None = None,
    ts: np.ndarray | None = None,
) -> Path:
    """Save predicted vs actual prices over the last ``last_n`` points as a PNG.

    Uses the Agg canvas directly (no pyplot, no global backend state), and writes through
    a temp file and a rename so a reader never sees half a picture.
    """
    path = Path(path)
    actual = np.asarray(actual, dtype=np.float64)[-last_n:]
    predicted = np.asarray(predicted, dtype=np.float64)[-last_n:]
    if ts is not None:
        x: Any = np.asarray(ts, dtype=np.int64)[-last_n:].astype("datetime64[ms]")
    else:
        x = np.arange(len(actual))
    figure = Figure(figsize=(10, 5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.plot(x, actual, label="actual", color="tab:blue", linewidth=1.5)
    axes.plot(x, predicted, label="predicted", color="tab:orange", linewidth=1.2)
    axes.set_title(title or f"Predicted vs actual price, last {len(actual)} test points")
    axes.set_xlabel("time" if ts is not None else "test point")
    axes.set_ylabel("price")
    axes.legend()
    axes.grid(alpha=0.3)
    if ts is not None:
        figure.autofmt_xdate()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        figure.savefig(tmp, format="png")
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; checkpoint files are world-readable
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# --------------------------------------------------------------------------- significance


@dataclass(frozen=True)
class DieboldMariano:
    """Diebold-Mariano test of equal squared-error loss, with the HLN correction.

    ``statistic`` is the Harvey-Leybourne-Newbold corrected DM statistic, compared with a
    Student t distribution with ``n - 1`` degrees of freedom. Negative means the model's
    squared errors are smaller than the benchmark's. ``p_better`` is the one-sided p-value
    of "the model is better" (H1: E[d] < 0); ``p_value`` is two-sided.
    """

    statistic: float
    p_value: float
    p_better: float
    mean_loss_difference: float  # mean of e_model**2 - e_benchmark**2
    n: int
    horizon: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def diebold_mariano(
    model_errors: np.ndarray, benchmark_errors: np.ndarray, horizon: int = 1
) -> DieboldMariano:
    """Diebold-Mariano (1995) test on squared errors with the HLN (1997) correction.

    ``d_t = e_model_t**2 - e_benchmark_t**2``; the long-run variance of ``d`` uses the
    autocovariances up to lag ``horizon - 1`` (an h-step forecast's errors are MA(h-1));
    ``DM = mean(d) / sqrt(V / n)`` and ``DM* = DM * sqrt((n + 1 - 2h + h(h-1)/n) / n)``.
    """
    from scipy import stats

    model_errors = np.asarray(model_errors, dtype=np.float64)
    benchmark_errors = np.asarray(benchmark_errors, dtype=np.float64)
    if model_errors.shape != benchmark_errors.shape or model_errors.ndim != 1:
        raise ValueError("model and benchmark errors must be 1-D of one length")
    n = len(model_errors)
    if n < 2:
        raise ValueError("the Diebold-Mariano test needs at least two forecasts")
    if not 1 <= horizon < n:
        raise ValueError(f"horizon must lie in [1, {n - 1}], got {horizon}")
    d = model_errors**2 - benchmark_errors**2
    mean = float(d.mean())
    centred = d - mean
    variance = float(centred @ centred) / n
    for lag in range(1, horizon):
        variance += 2.0 * float(centred[lag:] @ centred[:-lag]) / n
    if variance <= 0.0:
        # Identical losses everywhere (e.g. the untrained residual model vs naive).
        return DieboldMariano(0.0, 1.0, 0.5, mean, n, horizon)
    dm = mean / math.sqrt(variance / n)
    statistic = dm * math.sqrt((n + 1 - 2 * horizon + horizon * (horizon - 1) / n) / n)
    t = stats.t(df=n - 1)
    return DieboldMariano(
        statistic=statistic,
        p_value=float(2.0 * t.sf(abs(statistic))),
        p_better=float(t.cdf(statistic)),
        mean_loss_difference=mean,
        n=n,
        horizon=horizon,
    )


def block_bootstrap_rmse_ratio(
    model_errors: np.ndarray,
    benchmark_errors: np.ndarray,
    *,
    block_length: int | None = None,
    resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile CI of RMSE(model) / RMSE(benchmark) by a circular moving-block bootstrap.

    Blocks of consecutive forecasts are resampled together (the same indices for both
    forecasts) so that volatility clustering survives resampling. ``block_length``
    defaults to ``ceil(n ** (1/3))``.
    """
    model_sq = np.asarray(model_errors, dtype=np.float64) ** 2
    bench_sq = np.asarray(benchmark_errors, dtype=np.float64) ** 2
    n = len(model_sq)
    if n == 0 or model_sq.shape != bench_sq.shape:
        raise ValueError("model and benchmark errors must be 1-D of one non-zero length")
    block = block_length or max(1, math.ceil(n ** (1 / 3)))
    blocks = math.ceil(n / block)
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, n, size=(resamples, blocks))
    indices = ((starts[:, :, None] + np.arange(block)) % n).reshape(resamples, -1)[:, :n]
    model_mse = model_sq[indices].mean(axis=1)
    bench_mse = bench_sq[indices].mean(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = np.sqrt(model_mse / bench_mse)
    ratios = ratios[np.isfinite(ratios)]
    if len(ratios) == 0:
        return (math.nan, math.nan)
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(ratios, [tail, 100.0 - tail])
    return float(low), float(high)


def naive_scale(
    last: np.ndarray, targets: np.ndarray, series_index: np.ndarray, *, several: bool
) -> np.ndarray:
    """Per window, what its errors are divided by before pooling: its series' naive RMSE
    over these windows.

    With one series (``several`` false), 1: price units, so a one-series result is what it
    always was. With several, NaN for a series with fewer than
    :data:`MIN_SCALED_WINDOWS` of these windows or whose price never moved over them: a
    few errors divided by a tiny naive RMSE would outweigh every other series, so pooled
    figures leave those windows out (NaN-aware). If no series qualifies, price units.
    """
    if not several:
        return np.ones(len(targets))
    scale = np.full(len(targets), np.nan)
    for index in np.unique(series_index):
        rows = series_index == index
        naive_rmse = float(np.sqrt(np.mean((last[rows] - targets[rows]) ** 2)))
        if rows.sum() >= MIN_SCALED_WINDOWS and naive_rmse > 0:
            scale[rows] = naive_rmse
    return scale if np.isfinite(scale).any() else np.ones(len(targets))
