"""The one function pair that turns price windows into model inputs and back.

Training and serving both call :func:`scale_windows` and :func:`unscale`, so the two can
never drift apart. Scaling is min-max *per window*: each 60-step window is mapped onto
[0, 1] by its own low and high. Unlike one scaler fitted on a whole series this leaks no
future data, and it stays sane for prices far outside the training range and for symbols
never seen in training.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

SCALING_METHOD = "per_window_minmax"
# A flat window (high == low) would divide by zero; its span is floored at this fraction of
# its price level instead, so it scales to all zeros and unscales exactly.
MIN_SPAN_RATIO = 1e-6


@dataclass(frozen=True)
class ScaledWindows:
    """Model inputs for a batch of windows, with what is needed to scale back."""

    inputs: torch.Tensor  # [batch, window, 1] float32, each window in [0, 1]
    low: torch.Tensor  # [batch] float64, each window's minimum price
    span: torch.Tensor  # [batch] float64, each window's (max - min), floored


def as_price_tensor(
    prices: np.ndarray | torch.Tensor, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """A float64 tensor on ``device`` from a [batch, window] array of prices."""
    if isinstance(prices, np.ndarray):
        array = np.ascontiguousarray(prices, dtype=np.float64)
        if not array.flags.writeable:
            array = array.copy()  # torch cannot wrap read-only memory (it warns)
        prices = torch.from_numpy(array)
    return prices.to(device=device, dtype=torch.float64)


def scale_windows(prices: np.ndarray | torch.Tensor) -> ScaledWindows:
    """Scale a [batch, window] array of prices (oldest first) to model inputs."""
    windows = as_price_tensor(prices, prices.device if isinstance(prices, torch.Tensor) else "cpu")
    if windows.ndim != 2:
        raise ValueError(f"expected [batch, window] prices, got shape {tuple(windows.shape)}")
    low = windows.amin(dim=1)
    high = windows.amax(dim=1)
    span = torch.maximum(high - low, high.abs() * MIN_SPAN_RATIO).clamp_min(
        torch.finfo(torch.float64).tiny
    )
    scaled = (windows - low[:, None]) / span[:, None]
    return ScaledWindows(inputs=scaled.to(torch.float32).unsqueeze(-1), low=low, span=span)


def scale_targets(targets: np.ndarray | torch.Tensor, scaled: ScaledWindows) -> torch.Tensor:
    """Scale each window's next price by that window's own low and span (float32)."""
    next_prices = as_price_tensor(targets, scaled.low.device)
    return ((next_prices - scaled.low) / scaled.span).to(torch.float32)


def unscale(outputs: torch.Tensor, scaled: ScaledWindows) -> torch.Tensor:
    """Turn model outputs (scaled next prices) back into prices (float64)."""
    return outputs.to(torch.float64) * scaled.span + scaled.low
