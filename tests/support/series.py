"""Synthetic price series for the split property tests.

Synthetic on purpose: each price is 1 + its row number + 1e6 per series, so a window's
contents reveal exactly which rows of which series it was built from, and each series
starts at its own time, so series overlap in time in every way (disjoint, nested,
shifted), which a few bundled real series cannot cover.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from hypothesis import strategies as st

from model.data import PriceSeries

SERIES_OFFSET = 1e6  # added to every price of series k, times k

# (first timestamp in seconds, rows beyond the minimum) per series.
SPANS = st.lists(
    st.tuples(st.integers(min_value=0, max_value=200), st.integers(min_value=0, max_value=150)),
    min_size=1,
    max_size=4,
)


def row_numbered_series(spans: Sequence[tuple[int, int]], min_rows: int) -> list[PriceSeries]:
    """Series k has ``min_rows + extra`` rows, one a second from second ``start``."""
    return [
        PriceSeries(
            f"S{k}",
            "synthetic",
            (start + np.arange(min_rows + extra, dtype=np.int64)) * 1000,
            1.0 + k * SERIES_OFFSET + np.arange(min_rows + extra),
        )
        for k, (start, extra) in enumerate(spans)
    ]
