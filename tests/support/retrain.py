"""Shared by the retrain job's unit tests: quick training flags and the job's parser."""

from __future__ import annotations

import argparse

from model.retrain import add_retrain_arguments

WINDOW = 20
# Two epochs of a tiny model on 20-step windows: seconds, and still a real training run.
FAST = ["--epochs", "2", "--hidden-size", "8", "--window-length", str(WINDOW), "--no-progress"]


def parse(*argv: str) -> argparse.Namespace:
    """``tickcast retrain`` arguments, parsed as the job parses them."""
    parser = argparse.ArgumentParser()
    add_retrain_arguments(parser)
    return parser.parse_args(list(argv))
