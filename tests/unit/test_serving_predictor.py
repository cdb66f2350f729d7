"""``TICKCAST_INFERENCE`` picks the forward the daemon serves with (daemon/inference.py
``load_serving_predictor``): "reference" is nn.GRU, "fast" the scripted cell loop,
"compiled" the cell loop with its step compiled in the background. All three predict the
same prices for the same real windows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from daemon.inference import NoCheckpointError, load_serving_predictor
from daemon.settings import Settings
from model.data import load_series, make_windows
from tests.support.daemon import make_checkpoint

WINDOW = 60


@pytest.fixture(scope="module")
def checkpoint_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("checkpoints")
    make_checkpoint(root, window_length=WINDOW)
    return root


@pytest.fixture(scope="module")
def windows() -> np.ndarray:
    nasdaq = load_series("dataset:nasdaq")[0]
    cut, _ = make_windows(nasdaq.prices[-400:], WINDOW)
    return np.asarray(cut[-200:], dtype=np.float64)


def serving(root: Path, inference: str) -> Settings:
    return Settings(checkpoint_dir=root, device="cpu", inference=inference)


# Its wait for the compiled step (600 s) outlasts the suite's 300 s per test on a cold cache.
@pytest.mark.timeout(900)
def test_each_inference_setting_serves_its_forward(
    checkpoint_root: Path, windows: np.ndarray
) -> None:
    reference = load_serving_predictor(serving(checkpoint_root, "reference"))
    fast = load_serving_predictor(serving(checkpoint_root, "fast"))
    compiled = load_serving_predictor(serving(checkpoint_root, "compiled"))
    assert reference.path == "nn.GRU"
    assert fast.path == "scripted-cell"
    assert compiled.fast is not None and compiled.fast.compile_unit == "step"
    # Until its compilation is done (seconds, in a background thread) "compiled" serves
    # the cell loop; either way it must give the reference's prices.
    assert compiled.path in ("scripted-cell", "compiled-step")
    expected = reference.predict(windows)
    for predictor in (fast, compiled):
        np.testing.assert_allclose(predictor.predict(windows), expected, rtol=0, atol=1e-3)
    assert len(set(np.round(expected, 2).tolist())) > 100  # real windows, distinct prices
    # Then through the compiled step itself; waiting also keeps the compiling thread (which
    # sets environment variables) from outliving this test.
    assert compiled.fast.wait_compiled(timeout=600), compiled.fast.compile_error
    assert compiled.path == "compiled-step"
    np.testing.assert_allclose(compiled.predict(windows), expected, rtol=0, atol=1e-3)


def test_no_checkpoint_names_the_retrain_command(tmp_path: Path) -> None:
    with pytest.raises(NoCheckpointError, match="tickcast retrain --data dataset:nasdaq"):
        load_serving_predictor(serving(tmp_path, "fast"))


def test_latest_must_name_the_version_its_meta_records(tmp_path: Path) -> None:
    """A directory copied under another name (a hand-made rollback): the hot swap refuses
    it, and so does the start, rather than serve predictions labelled with another
    version than LATEST names."""
    import shutil

    from model.checkpoint import promote

    version = make_checkpoint(tmp_path, window_length=WINDOW)
    shutil.copytree(tmp_path / version, tmp_path / "rollback")
    promote(tmp_path, "rollback")
    with pytest.raises(NoCheckpointError, match=f"meta.json names version '{version}'"):
        load_serving_predictor(serving(tmp_path, "fast"))


@pytest.mark.parametrize("unreadable", ["meta.json", "weights"])
def test_an_unreadable_checkpoint_file_is_no_checkpoint(tmp_path: Path, unreadable: str) -> None:
    """Not only a missing file: any error reading one (here a directory in its place;
    permission denied or EIO alike) is a clear NoCheckpointError (exit 3), not a traceback."""
    import json

    version = make_checkpoint(tmp_path, window_length=WINDOW)
    meta_path = tmp_path / version / "meta.json"
    name = (
        "meta.json"
        if unreadable == "meta.json"
        else json.loads(meta_path.read_text())["weights_file"]
    )
    target = tmp_path / version / name
    target.unlink()
    target.mkdir()
    with pytest.raises(NoCheckpointError, match=f"cannot read .*{name}"):
        load_serving_predictor(serving(tmp_path, "fast"))
