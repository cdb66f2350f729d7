"""``python -m model``: the retrain job (the same as ``tickcast retrain``)."""

from __future__ import annotations

import argparse
import logging
import sys

from model.retrain import add_retrain_arguments, run_retrain


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m model",
        description="Train a GRU checkpoint, compare it with the naive forecast and the "
        "checkpoint in service, and promote it to LATEST if it is not worse.",
    )
    add_retrain_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return run_retrain(args)
    except KeyboardInterrupt:
        print("tickcast retrain: interrupted; nothing was promoted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
