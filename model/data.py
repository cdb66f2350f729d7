"""Price series: loading them, cutting them into windows, splitting them in time.

A :class:`PriceSeries` is one symbol's prices in event-time order. :func:`load_series`
reads one from a CSV/Parquet file (a Date + Close table such as the seed's ``QQQ.csv``, or
a long ``symbol, ts, price`` table with many symbols) or from a real data set shipped in a
PyPI package (``dataset:nasdaq``, ...). :func:`make_windows` turns prices into
(window, next price) pairs, oldest price first, and :func:`chronological_split` cuts them
into train / validation / test without letting any split see the future.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from model.tick_rules import MAX_TS_MS

logger = logging.getLogger(__name__)

DATASET_PREFIX = "dataset:"
# How several series are split: each at its own points (``series``), or all at the same
# event times (``time``), so that no training target is later than another series'
# validation or test target.
SplitBy = Literal["series", "time"]
# At least two rows, so that a series has one price and one next price.
MIN_ROWS = 2


class DataError(Exception):
    """Price data that cannot be used: missing, malformed, NaN, too short, unknown."""


@dataclass(frozen=True)
class PriceSeries:
    """One symbol's prices, oldest first.

    ``ts`` is event time in epoch milliseconds (int64, strictly increasing); ``prices`` are
    finite and positive (float64). Both arrays are read-only.
    """

    symbol: str
    source: str
    ts: np.ndarray
    prices: np.ndarray

    def __post_init__(self) -> None:
        ts = np.array(self.ts, dtype=np.int64, copy=True)
        prices = np.array(self.prices, dtype=np.float64, copy=True)
        where = f"{self.source} ({self.symbol})"
        if ts.ndim != 1 or prices.ndim != 1:
            raise DataError(f"{where}: ts and prices must be one-dimensional")
        if len(ts) != len(prices):
            raise DataError(f"{where}: {len(ts)} timestamps but {len(prices)} prices")
        if len(prices) == 0:
            raise DataError(f"{where}: no rows")
        bad = ~np.isfinite(prices)
        if bad.any():
            first = int(np.argmax(bad))
            raise DataError(
                f"{where}: {int(bad.sum())} price(s) are NaN or infinite, the first at row "
                f"{first} ({_iso(int(ts[first]))}); clean or drop those rows first"
            )
        nonpositive = prices <= 0
        if nonpositive.any():
            first = int(np.argmax(nonpositive))
            raise DataError(
                f"{where}: {int(nonpositive.sum())} price(s) are not positive, the first at "
                f"row {first} ({_iso(int(ts[first]))}): {prices[first]!r}"
            )
        steps = np.diff(ts)
        if (steps <= 0).any():
            first = int(np.argmax(steps <= 0)) + 1
            raise DataError(
                f"{where}: timestamps must be strictly increasing; row {first} "
                f"({_iso(int(ts[first]))}) does not come after row {first - 1}"
            )
        ts.setflags(write=False)
        prices.setflags(write=False)
        object.__setattr__(self, "ts", ts)
        object.__setattr__(self, "prices", prices)

    def __len__(self) -> int:
        return len(self.prices)

    def iso_range(self, start: int = 0, stop: int | None = None) -> tuple[str, str]:
        """ISO-8601 UTC times of rows ``start`` and ``stop - 1`` (a Python slice's ends)."""
        rows = self.ts[start:stop]
        if len(rows) == 0:
            raise ValueError(f"empty row range [{start}:{stop}] of {self.symbol}")
        return _iso(int(rows[0])), _iso(int(rows[-1]))


def _iso(epoch_ms: int) -> str:
    return datetime.fromtimestamp(epoch_ms / 1000, tz=UTC).isoformat()


# --------------------------------------------------------------------------- loading


def _arch_dataset(module: str) -> Callable[[], pd.DataFrame]:
    def load() -> pd.DataFrame:
        import importlib

        frame: pd.DataFrame = importlib.import_module(f"arch.data.{module}").load()
        return frame

    return load


def _backtesting_dataset(name: str) -> Callable[[], pd.DataFrame]:
    def load() -> pd.DataFrame:
        import backtesting.test

        frame: pd.DataFrame = getattr(backtesting.test, name).copy()
        return frame

    return load


# name -> (symbol, loader, preferred price columns). Real series shipped inside PyPI
# packages (install the `data` extra): daily indices from arch, daily GOOG, hourly EURUSD
# and monthly BTCUSD from backtesting.py.
DATASETS: dict[str, tuple[str, Callable[[], pd.DataFrame], tuple[str, ...]]] = {
    "nasdaq": ("NASDAQ", _arch_dataset("nasdaq"), ("adj close", "close")),
    "sp500": ("SP500", _arch_dataset("sp500"), ("adj close", "close")),
    "goog": ("GOOG", _backtesting_dataset("GOOG"), ("close",)),
    "eurusd": ("EURUSD", _backtesting_dataset("EURUSD"), ("close",)),
    "btcusd": ("BTCUSD", _backtesting_dataset("BTCUSD"), ("close",)),
}


def load_series(spec: str) -> list[PriceSeries]:
    """Load the price series named by ``spec``.

    ``spec`` is ``dataset:NAME`` (see :data:`DATASETS`) or a path to a ``.csv`` or
    ``.parquet`` file holding either a Date and a Close column (one series, symbol = the
    file's stem upper-cased) or ``symbol``, ``ts`` (epoch ms or datetime), ``price``
    columns (one series per symbol). Column names are case-insensitive. Rows are sorted by
    time. Raises :class:`DataError` for anything unusable.
    """
    if spec.lower().startswith(DATASET_PREFIX):
        return [_load_dataset(spec[len(DATASET_PREFIX) :].strip().lower(), spec)]
    return _load_file(Path(spec))


def load_many(specs: Iterable[str]) -> list[PriceSeries]:
    """Load every spec; the same symbol from two specs is an error (it would be trained twice)."""
    series: list[PriceSeries] = []
    for spec in specs:
        series.extend(load_series(spec))
    if not series:
        raise DataError("no price data given")
    seen: dict[str, str] = {}
    for one in series:
        if one.symbol in seen:
            raise DataError(
                f"symbol {one.symbol!r} comes from both {seen[one.symbol]} and {one.source}"
            )
        seen[one.symbol] = one.source
    return series


def _load_dataset(name: str, spec: str) -> PriceSeries:
    if name not in DATASETS:
        known = ", ".join(f"{DATASET_PREFIX}{key}" for key in DATASETS)
        raise DataError(f"unknown dataset {spec!r}; known data sets: {known}")
    symbol, loader, columns = DATASETS[name]
    try:
        frame = loader()
    except ImportError as exc:
        raise DataError(
            f"{spec} needs the optional data packages (pip install 'tickcast[data]'): {exc}"
        ) from exc
    frame = frame.rename_axis("Date").reset_index()
    return _date_close_series(frame, symbol=symbol, source=f"{DATASET_PREFIX}{name}", close=columns)


def _load_file(path: Path) -> list[PriceSeries]:
    if not path.exists():
        raise DataError(f"price file {path} does not exist")
    if not path.is_file():
        raise DataError(f"price file {path} is not a file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            frame = pd.read_csv(path)
        elif suffix in {".parquet", ".pq"}:
            frame = pd.read_parquet(path)
            if isinstance(frame.index, pd.DatetimeIndex):  # as df.to_parquet() leaves one
                frame = frame.rename_axis(str(frame.index.name or "Date")).reset_index()
        else:
            raise DataError(f"{path}: expected a .csv or .parquet file")
    except DataError:
        raise
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise DataError(f"{path} could not be read: {exc}") from exc
    if frame.empty:
        raise DataError(f"{path} holds no rows")
    columns = {str(column).strip().lower() for column in frame.columns}
    if {"symbol", "ts", "price"} <= columns:
        return _long_table_series(frame, source=str(path))
    return [_date_close_series(frame, symbol=path.stem.upper(), source=str(path), close=("close",))]


def _column(frame: pd.DataFrame, names: Sequence[str], source: str, what: str) -> pd.Series:
    by_lower = {str(column).strip().lower(): column for column in frame.columns}
    for name in names:
        if name in by_lower:
            column: pd.Series = frame[by_lower[name]]
            return column
    found = ", ".join(str(column) for column in frame.columns)
    wanted = " or ".join(repr(name.title()) for name in names)
    raise DataError(
        f"{source}: no {what} column (wanted {wanted}, case-insensitive); columns are: {found}. "
        "Expected a Date,Close table or a long symbol,ts,price table"
    )


def _date_close_series(
    frame: pd.DataFrame, symbol: str, source: str, close: Sequence[str]
) -> PriceSeries:
    dates = _column(frame, ("date", "datetime", "timestamp", "time"), source, "Date")
    prices = _column(frame, close, source, "Close")
    if pd.api.types.is_integer_dtype(dates) or (
        pd.api.types.is_float_dtype(dates) and (dates.dropna() % 1 == 0).all()
    ):  # 20240131, or 20240131.0 once a missing value made the column float
        dates = _yyyymmdd(dates, source)
    ts = _to_epoch_ms(dates, source)
    return _series_sorted(symbol, source, ts, _to_prices(prices, source))


def _yyyymmdd(dates: pd.Series, source: str) -> pd.Series:
    """A Date column of integers must be YYYYMMDD (20240131): read as epoch ms, it would put
    every row in January 1970. Epoch times belong in a long table's ``ts`` column."""
    digits = dates.astype("Int64").astype(str)  # 20240131.0 -> "20240131"; missing -> "<NA>"
    parsed = pd.to_datetime(digits, format="%Y%m%d", errors="coerce", utc=True)
    if parsed.isna().any():
        first = int(np.argmax(parsed.isna().to_numpy()))
        raise DataError(
            f"{source}: the Date column holds numbers that are not YYYYMMDD dates, the first "
            f"at row {first}: {dates.iloc[first]!r} (epoch times go in a symbol,ts,price table)"
        )
    return parsed


def _long_table_series(frame: pd.DataFrame, source: str) -> list[PriceSeries]:
    symbols = _column(frame, ("symbol",), source, "symbol")
    if symbols.isna().any():
        raise DataError(f"{source}: {int(symbols.isna().sum())} row(s) have no symbol")
    ts = _to_epoch_ms(_column(frame, ("ts",), source, "ts"), source)
    prices = _to_prices(_column(frame, ("price",), source, "price"), source)
    names = symbols.astype(str).str.strip().to_numpy()
    series = []
    for name in pd.unique(names):
        rows = names == name
        series.append(_series_sorted(str(name), source, ts[rows], prices[rows]))
    return series


# Event times are epoch milliseconds after 1970 and before 2286 (MAX_TS_MS, a tick's
# bound too: a ts in micro- or nanoseconds is a producer bug). Below 1e11 (1973) a whole
# column would rather be epoch seconds.
_SECONDS_LIKELY_BELOW = 10**11

# Dates pandas can hold at nanosecond resolution (1677-09-21 .. 2262-04-11), in epoch ms.
_MIN_DATE_MS = pd.Timestamp.min.value // 1_000_000 + 1
_MAX_DATE_MS = pd.Timestamp.max.value // 1_000_000


def _to_epoch_ms(values: pd.Series, source: str) -> np.ndarray:
    if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
        if values.isna().any():
            raise DataError(f"{source}: {int(values.isna().sum())} timestamp(s) are missing")
        numbers = values.to_numpy(dtype=np.float64)
        if (numbers <= 0).any() or (numbers >= MAX_TS_MS).any():
            raise DataError(
                f"{source}: ts must be epoch milliseconds after 1970 and before 2286; found "
                f"{numbers.min():.0f} .. {numbers.max():.0f} (microseconds or nanoseconds? "
                "divide them)"
            )
        if numbers.max() < _SECONDS_LIKELY_BELOW:
            raise DataError(
                f"{source}: every ts is before 1973 as epoch milliseconds (largest "
                f"{numbers.max():.0f}): epoch seconds? multiply them by 1000"
            )
        return numbers.astype(np.int64)
    try:
        parsed = pd.to_datetime(values, utc=True)
    except (ValueError, TypeError) as exc:
        raise DataError(f"{source}: dates could not be parsed: {exc}") from exc
    if parsed.isna().any():
        raise DataError(f"{source}: {int(parsed.isna().sum())} date(s) are missing")
    # pandas 3 parses far dates (3000-01-01) at microsecond resolution; arithmetic with a
    # nanosecond Timestamp would then overflow. Convert in the parsed unit (floored to ms)
    # and keep dates to the range pandas' default nanosecond resolution can hold.
    naive = parsed.dt.tz_localize(None).to_numpy()
    ms: np.ndarray = naive.astype("datetime64[ms]").view(np.int64)
    outside = (ms < _MIN_DATE_MS) | (ms > _MAX_DATE_MS)
    if outside.any():
        first = int(np.argmax(outside))
        raise DataError(
            f"{source}: {int(outside.sum())} date(s) outside the supported range "
            f"{_iso(_MIN_DATE_MS)[:10]} to {_iso(_MAX_DATE_MS)[:10]}, the first at row {first}: "
            f"{values.iloc[first]!r}"
        )
    return ms


def _to_prices(values: pd.Series, source: str) -> np.ndarray:
    # Unparseable cells (Yahoo's "null") become NaN, which PriceSeries reports clearly.
    numbers: np.ndarray = pd.to_numeric(values, errors="coerce").to_numpy(
        dtype=np.float64, na_value=np.nan
    )
    return numbers


def _series_sorted(symbol: str, source: str, ts: np.ndarray, prices: np.ndarray) -> PriceSeries:
    if len(prices) < MIN_ROWS:
        raise DataError(f"{source} ({symbol}): {len(prices)} row(s); at least {MIN_ROWS} needed")
    order = np.argsort(ts, kind="stable")
    return PriceSeries(symbol=symbol, source=source, ts=ts[order], prices=prices[order])


# --------------------------------------------------------------------------- windows


def make_windows(prices: np.ndarray, window_length: int) -> tuple[np.ndarray, np.ndarray]:
    """All (window, next price) pairs of a 1-D price array, in true time order.

    ``windows[i]`` is ``prices[i : i + window_length]`` (oldest first) and ``targets[i]`` is
    ``prices[i + window_length]``. Both are read-only views, not copies. A series shorter
    than ``window_length + 1`` gives zero windows.
    """
    if window_length < 1:
        raise ValueError(f"window_length must be at least 1, got {window_length}")
    values = np.asarray(prices, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"expected a 1-D price array, got shape {values.shape}")
    count = max(len(values) - window_length, 0)
    if count == 0:
        return np.empty((0, window_length)), np.empty(0)
    windows = np.lib.stride_tricks.sliding_window_view(values, window_length)[:count]
    targets = values[window_length:]
    return windows, targets


@dataclass(frozen=True)
class WindowSet:
    """Windows of one split, possibly from several series (never crossing one)."""

    windows: np.ndarray  # [n, window] float64, oldest price first
    targets: np.ndarray  # [n] float64, the price after each window
    target_ts: np.ndarray  # [n] int64, event time of each target
    series_index: np.ndarray  # [n] int64, which series (index into the split's series)

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def last(self) -> np.ndarray:
        """The newest price in each window: the naive forecast of the target."""
        return self.windows[:, -1]

    def of_series(self, index: int) -> WindowSet:
        rows = self.series_index == index
        return WindowSet(
            self.windows[rows], self.targets[rows], self.target_ts[rows], self.series_index[rows]
        )


@dataclass(frozen=True)
class SeriesCut:
    """How one series was split: counts of targets in each split, in time order."""

    series: PriceSeries
    train: int
    val: int
    test: int

    @property
    def fit_rows(self) -> int:
        """Rows used for fitting (train + validation windows and targets): a prefix."""
        return len(self.series) - self.test


@dataclass(frozen=True)
class ChronologicalSplit:
    train: WindowSet
    val: WindowSet
    test: WindowSet
    cuts: tuple[SeriesCut, ...]
    window_length: int


def _split_counts(targets: int, val_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    test = max(1, round(targets * test_fraction))
    val = max(1, round(targets * val_fraction))
    # Rounding up small splits can leave training nothing; give it back one at a time.
    while targets - val - test < 1 and (val > 1 or test > 1):
        if val >= test:
            val -= 1
        else:
            test -= 1
    return targets - val - test, val, test


def covered_time(target_ts: Sequence[np.ndarray]) -> tuple[int, int]:
    """The first and the last event time of all series' targets together."""
    nonempty = [ts for ts in target_ts if len(ts)]
    if not nonempty:
        raise DataError("no series has a target to split")
    return min(int(ts[0]) for ts in nonempty), max(int(ts[-1]) for ts in nonempty)


def common_time_cuts(
    target_ts: Sequence[np.ndarray], val_fraction: float, test_fraction: float
) -> tuple[int, int]:
    """The event times at which validation and test begin for every series at once: the
    time all series' targets cover, cut in the given shares of its length. Shares of time,
    not of targets: a symbol that ticks a hundred times as often must not move the cuts
    (its burst at the end would push every other series out of the test period)."""
    first, last = covered_time(target_ts)
    span = last - first + 1
    return (
        first + math.floor(span * (1 - val_fraction - test_fraction)),
        first + math.floor(span * (1 - test_fraction)),
    )


def uncovered_split(one: PriceSeries, counts: Sequence[int], starts: Sequence[int]) -> str | None:
    """Why ``one`` cannot take part in a common time split (a split it has no target in),
    or None. ``counts`` are its targets per split, ``starts`` when validation and test
    begin."""
    empty = [
        name for name, n in zip(("training", "validation", "test"), counts, strict=True) if n < 1
    ]
    if not empty:
        return None
    return (
        f"{one.source} ({one.symbol}) has no {' or '.join(empty)} target in the common time "
        f"split: its prices run from {_iso(int(one.ts[0]))} to {_iso(int(one.ts[-1]))}, "
        f"and the split's validation period starts at {_iso(starts[0])}, its test period "
        f"at {_iso(starts[1])}"
    )


def chronological_split(
    series: PriceSeries | Sequence[PriceSeries],
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    window_length: int = 60,
    *,
    split_by: SplitBy = "series",
    skip_uncovered: bool = False,
) -> ChronologicalSplit:
    """Split each series' (window, target) pairs by target time: train, then val, then test.

    Every window holds only prices before its target, and every validation target comes
    after every training target (test after validation), per series. A later split's
    windows may include earlier splits' prices; that is the past, not look-ahead. Nothing
    is fitted on the data here: the per-window scaling needs no fitting. Several series
    are split one by one and then concatenated, so no window crosses two series.

    ``split_by="series"`` cuts each series at its own shares of its targets, so with
    series from different years one series' test period can lie before another's training
    targets. ``split_by="time"`` cuts them all at the same two event times, the shares of
    the time they cover (:func:`common_time_cuts`), so that order holds across series too;
    a series without a target in each of the three periods is then a :class:`DataError`,
    or left out with a log line if ``skip_uncovered``.

    Raises :class:`DataError` when a series has fewer than ``window_length + 3`` rows (one
    window plus one target for each split).
    """
    if not 0 < val_fraction < 1 or not 0 < test_fraction < 1:
        raise ValueError("val_fraction and test_fraction must lie strictly between 0 and 1")
    if val_fraction + test_fraction >= 1:
        raise ValueError("val_fraction + test_fraction must leave some data for training")
    all_series = [series] if isinstance(series, PriceSeries) else list(series)
    if not all_series:
        raise DataError("no price series to split")
    for one in all_series:
        if len(one) < window_length + 3:
            raise DataError(
                f"{one.source} ({one.symbol}) has {len(one)} rows; a window length of "
                f"{window_length} needs at least {window_length + 3} (one window plus one "
                "target each for training, validation and test)"
            )
    starts = (0, 0)
    if split_by == "time":
        starts = common_time_cuts(
            [one.ts[window_length:] for one in all_series], val_fraction, test_fraction
        )
    parts: dict[str, list[WindowSet]] = {"train": [], "val": [], "test": []}
    cuts: list[SeriesCut] = []
    for one in all_series:
        windows, targets = make_windows(one.prices, window_length)
        target_ts = one.ts[window_length:]
        if split_by == "series":
            train, val, test = _split_counts(len(targets), val_fraction, test_fraction)
        else:
            train, val_stop = (int(i) for i in np.searchsorted(target_ts, starts))
            val, test = val_stop - train, len(targets) - val_stop
            problem = uncovered_split(one, (train, val, test), starts)
            if problem and skip_uncovered:
                logger.info("leaving out %s", problem)
                continue
            if problem:
                raise DataError(f"{problem}; leave it out, or split each series by its own length")
        index = len(cuts)
        bounds = {"train": (0, train), "val": (train, train + val), "test": (train + val, None)}
        for name, (start, stop) in bounds.items():
            rows = slice(start, stop)
            parts[name].append(
                WindowSet(
                    windows[rows],
                    targets[rows],
                    target_ts[rows],
                    np.full(len(targets[rows]), index, dtype=np.int64),
                )
            )
        cuts.append(SeriesCut(one, train, val, test))
    if not cuts:
        raise DataError("no series has a target in each period of the common time split")

    def concat(sets: list[WindowSet]) -> WindowSet:
        return WindowSet(
            np.concatenate([s.windows for s in sets]),
            np.concatenate([s.targets for s in sets]),
            np.concatenate([s.target_ts for s in sets]),
            np.concatenate([s.series_index for s in sets]),
        )

    return ChronologicalSplit(
        train=concat(parts["train"]),
        val=concat(parts["val"]),
        test=concat(parts["test"]),
        cuts=tuple(cuts),
        window_length=window_length,
    )
