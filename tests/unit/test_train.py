"""Training on real data: the loss goes down, the best weights come back, runs repeat exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model import train as train_module
from model.data import WindowSet, chronological_split, load_series
from model.features import scale_targets, scale_windows
from model.gru import ModelConfig, PriceGRU, predict_prices
from model.train import TrainConfig, TrainResult, resolve_device, train_model

WINDOW = 30


@pytest.fixture(scope="module")
def nasdaq_split() -> tuple[WindowSet, WindowSet]:
    """The last 1200 days of the real NASDAQ index, split in time."""
    (series,) = load_series("dataset:nasdaq")
    split = chronological_split(
        type(series)(series.symbol, series.source, series.ts[-1200:], series.prices[-1200:]),
        window_length=WINDOW,
    )
    return split.train, split.val


def fit(data: tuple[WindowSet, WindowSet], model: ModelConfig, config: TrainConfig) -> TrainResult:
    train, val = data
    return train_model(
        train.windows, train.targets, val.windows, val.targets, model, config, progress=False
    )


def test_defaults() -> None:
    config = TrainConfig()
    assert (config.epochs, config.batch_size, config.lr, config.weight_decay) == (30, 256, 1e-3, 0)
    assert (config.patience, config.seed, config.device) == (5, 0, "auto")


def test_untrained_residual_model_is_the_naive_forecast(
    nasdaq_split: tuple[WindowSet, WindowSet],
) -> None:
    windows = nasdaq_split[1].windows
    predicted = predict_prices(PriceGRU(ModelConfig(window_length=WINDOW)), windows).numpy()
    np.testing.assert_allclose(predicted, windows[:, -1], rtol=1e-6)


def test_training_lowers_validation_loss(nasdaq_split: tuple[WindowSet, WindowSet]) -> None:
    # The seed's plain head starts far from the answer, so learning must show.
    result = fit(
        nasdaq_split,
        ModelConfig(hidden_size=16, window_length=WINDOW, residual=False),
        TrainConfig(epochs=4, lr=1e-2, batch_size=64),
    )
    assert result.history[0].epoch == 0
    assert result.best_val_loss < 0.5 * result.history[0].val_loss
    assert result.history[-1].train_loss < result.history[1].train_loss
    assert result.best_val_loss == min(h.val_loss for h in result.history)
    assert result.history[result.best_epoch].val_loss == result.best_val_loss
    assert not result.model.training


def test_residual_model_never_ends_worse_than_untrained(
    nasdaq_split: tuple[WindowSet, WindowSet],
) -> None:
    result = fit(
        nasdaq_split,
        ModelConfig(hidden_size=8, window_length=WINDOW),
        TrainConfig(epochs=3, lr=3e-2, batch_size=64, patience=1),
    )
    assert result.best_val_loss <= result.history[0].val_loss
    # Early stopping: never more than `patience` epochs after the best one.
    assert len(result.history) - 1 <= result.best_epoch + 1
    # The returned weights are the best epoch's: recomputing the val loss gives it back.
    val = nasdaq_split[1]
    scaled = scale_windows(val.windows)
    with torch.inference_mode():
        loss = torch.nn.functional.mse_loss(
            result.model(scaled.inputs), scale_targets(val.targets, scaled)
        )
    assert float(loss) == pytest.approx(result.best_val_loss, rel=1e-5)


def test_training_is_reproducible(nasdaq_split: tuple[WindowSet, WindowSet]) -> None:
    model = ModelConfig(hidden_size=8, window_length=WINDOW)
    config = TrainConfig(epochs=2, lr=1e-2, batch_size=128)
    first, second = fit(nasdaq_split, model, config), fit(nasdaq_split, model, config)
    assert first.history == second.history
    for name, tensor in first.model.state_dict().items():
        assert torch.equal(tensor, second.model.state_dict()[name]), name
    other = fit(nasdaq_split, model, config.model_copy(update={"seed": 1}))
    assert other.history != first.history


def test_thread_count_is_restored(nasdaq_split: tuple[WindowSet, WindowSet]) -> None:
    before = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    fit(
        nasdaq_split,
        ModelConfig(hidden_size=4, window_length=WINDOW),
        TrainConfig(epochs=1, num_threads=1),
    )
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == before


def test_window_length_must_match(nasdaq_split: tuple[WindowSet, WindowSet]) -> None:
    with pytest.raises(ValueError, match="expects"):
        fit(nasdaq_split, ModelConfig(window_length=WINDOW + 1), TrainConfig(epochs=1))


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="device"):
        resolve_device("tpu")
    if torch.cuda.is_available():
        assert resolve_device("cuda") == torch.device("cuda")
        assert resolve_device("cuda:0") == torch.device("cuda:0")
        with pytest.raises(ValueError, match="GPU"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")
    else:
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


@pytest.mark.parametrize("loss", ["scaled", "relative"])
def test_scaling_in_chunks_gives_what_scaling_at_once_does(
    nasdaq_split: tuple[WindowSet, WindowSet], monkeypatch: pytest.MonkeyPatch, loss: str
) -> None:
    train, _ = nasdaq_split
    cpu = torch.device("cpu")
    whole = train_module._scaled_tensors(train.windows, train.targets, cpu, loss)
    monkeypatch.setattr(train_module, "SCALE_CHUNK", 97)  # not a divisor of the row count
    assert len(train) % 97
    chunked = train_module._scaled_tensors(train.windows, train.targets, cpu, loss)
    for at_once, in_chunks in zip(whole, chunked, strict=True):
        assert torch.equal(at_once, in_chunks)
    scaled = scale_windows(train.windows)
    assert torch.equal(chunked[0], scaled.inputs)
    assert torch.equal(chunked[1], scale_targets(train.targets, scaled))
    if loss == "relative":  # (span / last price)^2, float32
        last = torch.from_numpy(np.ascontiguousarray(train.windows[:, -1]))
        np.testing.assert_allclose(chunked[2], ((scaled.span / last) ** 2).float(), rtol=1e-6)
    else:
        assert torch.equal(chunked[2], torch.ones(len(train)))


def test_a_training_time_limit_stops_within_the_epoch_that_spends_it(
    nasdaq_split: tuple[WindowSet, WindowSet], caplog: pytest.LogCaptureFixture
) -> None:
    small = ModelConfig(hidden_size=8, window_length=WINDOW)
    unlimited = fit(nasdaq_split, small, TrainConfig(epochs=3, patience=10, device="cpu"))
    assert len(unlimited.history) == 4 and not unlimited.out_of_time
    train, _ = nasdaq_split
    batch = 64
    assert len(train) > 2 * batch  # an epoch of several batches, to be cut after the first
    limited_config = TrainConfig(
        epochs=3, patience=10, device="cpu", batch_size=batch, max_seconds=1e-6
    )
    with caplog.at_level("WARNING", logger=train_module.logger.name):
        limited = fit(nasdaq_split, small, limited_config)
    assert len(limited.history) == 2 and limited.out_of_time  # epoch 0, then one cut epoch
    assert f"within ({batch} of {len(train)} windows) epoch 1 of 3" in caplog.text
    # The cut epoch was scored like any other, and the best of the two is what was kept.
    assert limited.best_epoch in (0, 1)
    assert limited.best_val_loss == min(h.val_loss for h in limited.history)
    cut = limited.history[1]
    assert cut.val_loss != limited.history[0].val_loss  # one optimiser step moved it


def test_a_limit_spent_when_an_epoch_ends_stops_after_it(
    nasdaq_split: tuple[WindowSet, WindowSet],
) -> None:
    train, _ = nasdaq_split
    whole = len(train)  # one batch per epoch: the limit can only be noticed at its end
    small = ModelConfig(hidden_size=8, window_length=WINDOW)
    three = TrainConfig(epochs=3, patience=10, device="cpu", batch_size=whole, max_seconds=1e-6)
    stopped = fit(nasdaq_split, small, three)
    assert len(stopped.history) == 2 and stopped.out_of_time
    # At the last epoch it is not "out of time": every epoch asked for ran.
    one = TrainConfig(epochs=1, patience=10, device="cpu", batch_size=whole, max_seconds=1e-6)
    result = fit(nasdaq_split, small, one)
    assert len(result.history) == 2 and not result.out_of_time
