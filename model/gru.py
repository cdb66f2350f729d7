"""The seed's network: GRU(1 -> hidden) + Linear(hidden -> 1) on the last step."""

from __future__ import annotations

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from model.features import as_price_tensor, scale_windows, unscale


class ModelConfig(BaseModel):
    """Architecture of a :class:`PriceGRU`; recorded in every checkpoint."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = "gru"
    input_size: int = Field(default=1, ge=1, le=1)
    hidden_size: int = Field(default=64, ge=1, le=4096)
    num_layers: int = Field(default=1, ge=1, le=8)
    window_length: int = Field(default=60, ge=2, le=10_000)
    # Residual head: predict last price + learned correction. With the head's weights at
    # zero the untrained model *is* the naive forecast, which is very hard to beat.
    residual: bool = True
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)


class PriceGRU(nn.Module):
    """Predicts the next scaled price from a [batch, window, 1] scaled window."""

    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__()
        self.config = config or ModelConfig()
        self.gru = nn.GRU(
            input_size=self.config.input_size,
            hidden_size=self.config.hidden_size,
            num_layers=self.config.num_layers,
            batch_first=True,
            dropout=self.config.dropout if self.config.num_layers > 1 else 0.0,
        )
        self.head = nn.Linear(self.config.hidden_size, 1)
        if self.config.residual:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        outputs, _ = self.gru(inputs)
        correction = self.head(outputs[:, -1, :]).squeeze(-1)
        if self.config.residual:
            return inputs[:, -1, 0] + correction
        return correction


def predict_prices(model: nn.Module, prices: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Next-price predictions (float64, on the model's device) for [batch, window] prices.

    The reference path: scale, one forward pass, scale back. Serving may use a faster
    forward, but always the same scaling.
    """
    device = next(model.parameters()).device
    scaled = scale_windows(as_price_tensor(prices, device))
    with torch.inference_mode():
        return unscale(model(scaled.inputs), scaled)
