"""``python -m model``: the retrain job (the same as ``tickcast retrain``)."""

from __future__ import annotations

import argparse

from model.retrain import add_retrain_arguments, run_retrain_command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m model",
        description="Train a GRU checkpoint, compare it with the naive forecast and the "
        "checkpoint in service, and promote it to LATEST if it is not worse.",
    )
    add_retrain_arguments(parser)
    return run_retrain_command(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
