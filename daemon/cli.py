"""The ``tickcast`` command: serve, retrain, replay, demo, bench.

Settings come from ``TICKCAST_*`` environment variables; a CLI flag of the same name
(``--max-batch-size`` for ``TICKCAST_MAX_BATCH_SIZE``) overrides it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import sys
from collections.abc import Callable, Sequence

from pydantic import ValidationError

from daemon.settings import Settings
from model.arguments import non_negative_int

logger = logging.getLogger("tickcast")

# Flags every Kafka-facing subcommand takes; the rest of Settings belongs to serve.
KAFKA_FIELDS = (
    "bootstrap_servers",
    "input_topic",
    "security_protocol",
    "sasl_mechanism",
    "sasl_username",
    "sasl_password",
    "ssl_cafile",
)


def add_settings_arguments(
    parser: argparse.ArgumentParser, fields: Sequence[str] | None = None
) -> None:
    """One ``--flag`` per Settings field (default None: the environment decides)."""
    group = parser.add_argument_group("settings (override TICKCAST_* environment variables)")
    for name, field in Settings.model_fields.items():
        if fields is not None and name not in fields:
            continue
        flag = "--" + name.replace("_", "-")
        env = "TICKCAST_" + name.upper()
        help_text = f"env {env} (default: {field.default})"
        if field.annotation is bool:
            group.add_argument(
                flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        else:
            group.add_argument(flag, dest=name, default=None, metavar=name.upper(), help=help_text)


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides = {
        name: getattr(args, name)
        for name in Settings.model_fields
        if getattr(args, name, None) is not None
    }
    return Settings(**overrides)


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("aiokafka", "kafka"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))


def device_error(device: str) -> str | None:
    """Why ``device`` cannot be used here (``cuda`` without a GPU, ``cuda:3`` with one),
    or None when it can; ``auto`` always can (CPU when there is no GPU)."""
    from model.train import resolve_device

    try:
        resolve_device(device)
    except ValueError as exc:
        return str(exc)
    return None


# ---------------------------------------------------------------------------- serve
def run_serve(args: argparse.Namespace) -> int:
    from daemon.inference import NoCheckpointError
    from daemon.service import TickcastService

    settings = settings_from_args(args)
    configure_logging(settings.log_level)
    problem = device_error(settings.device)
    if problem is not None:
        print(
            f"tickcast serve: {problem} (--device / TICKCAST_DEVICE; 'auto' falls back to the CPU)",
            file=sys.stderr,
        )
        return 2

    async def main() -> int:
        try:
            service = TickcastService(settings)
        except NoCheckpointError as exc:
            print(f"tickcast serve: {exc}", file=sys.stderr)
            return 3
        await service.serve()
        if service.failed:
            return 1
        return 130 if service.force_exit else 0

    return asyncio.run(main())


# ---------------------------------------------------------------------------- replay
def positive_number(text: str) -> float:
    """An argparse type: a finite number above 0 (a rate, a duration)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite positive number, got {text!r}")
    return value


def rate_or_max(text: str) -> float | None:
    """An argparse type: ``max`` (None: as fast as the broker takes them) or a rate."""
    if text.strip().lower() == "max":
        return None
    try:
        return positive_number(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"must be a finite positive number or 'max', got {text!r}"
        ) from None


def add_replay_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        action="append",
        required=True,
        metavar="PATH|dataset:NAME",
        help="CSV/Parquet with Date and Close columns, a long (symbol, ts, price) "
        "table, or dataset:nasdaq|sp500|goog|eurusd|btcusd; repeat for more symbols",
    )
    parser.add_argument(
        "--rate", type=rate_or_max, default="max", help="ticks per second, or 'max' (default)"
    )
    parser.add_argument("--limit", type=non_negative_int, default=None, help="stop after N ticks")
    parser.add_argument(
        "--restamp", action="store_true", help="replace historic event times with the wall clock"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_settings_arguments(parser, KAFKA_FIELDS)


def run_replay(args: argparse.Namespace) -> int:
    from aiokafka import AIOKafkaProducer
    from aiokafka.errors import KafkaError

    from daemon.replay import ReplayError, TickStream, replay
    from model.data import DataError, load_many

    settings = settings_from_args(args)
    configure_logging(settings.log_level)
    if logging.getLevelName(settings.log_level) > logging.DEBUG:
        # A failure ends in one line below; aiokafka's own log lines would repeat it.
        for noisy in ("aiokafka", "kafka"):
            logging.getLogger(noisy).setLevel(logging.CRITICAL)
    rate: float | None = args.rate
    try:
        stream = TickStream.merge(load_many(args.data), limit=args.limit)
    except DataError as exc:
        print(f"tickcast replay: {exc}", file=sys.stderr)
        return 2

    async def main() -> int:
        producer = AIOKafkaProducer(
            bootstrap_servers=settings.bootstrap_servers,
            acks="all",
            enable_idempotence=True,
            linger_ms=5,
            **settings.client_kwargs(),
        )
        try:
            await producer.start()
        except KafkaError as exc:
            await producer.stop()
            print(
                f"tickcast replay: error: cannot reach the broker at "
                f"{settings.bootstrap_servers}: {exc} (0 ticks acknowledged)",
                file=sys.stderr,
            )
            return 1
        try:
            sent = await replay(
                producer,
                settings.input_topic,
                stream,
                rate=rate,
                restamp=args.restamp,
                progress=not args.no_progress and sys.stderr.isatty(),
            )
        except ReplayError as exc:
            print(
                f"tickcast replay: error: producing to {settings.input_topic} failed: {exc}",
                file=sys.stderr,
            )
            return 1
        finally:
            await producer.stop()
        n_symbols = len(set(stream.symbols.tolist()))
        print(f"replayed {sent} ticks of {n_symbols} symbols to {settings.input_topic}")
        return 0

    return asyncio.run(main())


# ---------------------------------------------------------------------------- retrain
def add_retrain_arguments(parser: argparse.ArgumentParser) -> None:
    from model.retrain import add_retrain_arguments as add

    add(parser)


def run_retrain(args: argparse.Namespace) -> int:
    from model.retrain import run_retrain_command as run

    return run(args)


# ---------------------------------------------------------------------------- demo, bench
def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    from daemon.demo import add_demo_arguments as add

    add(parser)


def run_demo(args: argparse.Namespace) -> int:
    from daemon.demo import run_demo as run

    return run(args)


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    from daemon.bench.run import add_bench_arguments as add

    add(parser)


def run_bench(args: argparse.Namespace) -> int:
    from daemon.bench.run import run_bench as run

    return run(args)


# ---------------------------------------------------------------------------- main
Command = tuple[
    str, str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]
]


def commands() -> list[Command]:
    return [
        ("serve", "run the streaming daemon", lambda p: add_settings_arguments(p), run_serve),
        ("retrain", "train, evaluate and publish a checkpoint", add_retrain_arguments, run_retrain),
        ("replay", "produce real price series as ticks", add_replay_arguments, run_replay),
        ("demo", "one-command quickstart on an embedded broker", add_demo_arguments, run_demo),
        ("bench", "end-to-end benchmark on a real broker", add_bench_arguments, run_bench),
    ]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tickcast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text, add_arguments, run in commands():
        command = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(command)
        command.set_defaults(run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except ValidationError as exc:
        print(f"tickcast {args.command}: invalid settings:\n{exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
