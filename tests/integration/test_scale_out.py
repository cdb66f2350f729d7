"""Several daemons in one consumer group, exactly-once mode, and SASL.

Kafka's partition assignment is the distributed engine: when an instance dies or joins,
its partitions move, the new owner rebuilds the windows from the input topic, and the
next tick of every moved symbol is scored on the window an uninterrupted single instance
would have had.
"""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from uuid import uuid4

import pytest
from aiokafka import AIOKafkaProducer
from prometheus_client.parser import text_string_to_metric_families

from daemon.embedded_kafka import KafkaBroker, create_topics, pick_free_ports
from daemon.replay import TickStream, replay
from model.data import load_many
from tests.integration.test_daemon_recovery import check_complete, expected_count
from tests.support.daemon import DaemonProcess, consume, daemon_settings, running_daemon
from tests.support.polling import wait_until

pytestmark = pytest.mark.kafka

PER_SYMBOL = 200
SYMBOLS = ["dataset:nasdaq", "dataset:sp500", "dataset:goog", "dataset:eurusd", "dataset:btcusd"]


def long_real_stream() -> TickStream:
    series = load_many(SYMBOLS)
    trimmed = [
        type(s)(s.symbol, s.source, s.ts[-PER_SYMBOL:], s.prices[-PER_SYMBOL:]) for s in series
    ]
    return TickStream.merge(trimmed)


@pytest.mark.timeout(600)  # the wait for the predictions alone may take 300 s (below)
@pytest.mark.parametrize("delivery", ["at_least_once", "exactly_once"])
async def test_kill_one_of_two_instances_mid_stream_then_add_a_third(
    kafka_bootstrap, topic_factory, checkpoint_dir, unique_group, tmp_path, delivery
):
    topics = {
        "input": await topic_factory(partitions=4, prefix="ticks"),
        "output": await topic_factory(partitions=4, prefix="predictions"),
        "dlq": await topic_factory(partitions=1, prefix="dlq"),
    }
    settings = daemon_settings(
        kafka_bootstrap, topics, checkpoint_dir, unique_group, delivery=delivery
    )
    stream = long_real_stream()
    first, second = (
        DaemonProcess(settings, tmp_path / "a.log"),
        DaemonProcess(settings, tmp_path / "b.log"),
    )
    first.start()
    second.start()
    await asyncio.gather(first.wait_ready(), second.wait_ready())

    # Every symbol's window is full within the head (the last, SP500's, at tick 596 of
    # 956), so both instances publish before it ends whichever partitions they hold; the
    # tail follows the kill, so the kill is mid-stream however slow the machine is.
    head, tail = stream.split(700)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await producer.start()
    try:
        feeding = asyncio.create_task(replay(producer, topics["input"], head, rate=250))
        # Kill once both instances are publishing: the survivor must take over live work.
        for instance in (first, second):
            await wait_until(partial(published, instance), "predictions from both instances")
        first.kill()
        third = DaemonProcess(settings, tmp_path / "c.log")
        third.start()
        await feeding
        await replay(producer, topics["input"], tail, rate=250)
    finally:
        await producer.stop()
    await third.wait_ready()
    total = expected_count(stream)
    # Exactly-once: the killed instance's open transaction holds its partitions' output
    # back until the broker aborts it (the producer's 60 s transaction timeout; its id is
    # per process here), then the tail follows: on a loaded 2-core machine (a CI run with
    # other tests beside it) 120 s once fell short. The wait ends as soon as all are in.
    predictions = await consume(
        kafka_bootstrap, topics["output"], total, timeout_s=300, settle_s=2.0
    )
    assert second.terminate() == 0
    assert third.terminate() == 0
    exactly_once = delivery == "exactly_once"
    check_complete(predictions, stream, checkpoint_dir, allow_duplicates=not exactly_once)
    if exactly_once:
        assert len(predictions) == total


def published(daemon: DaemonProcess) -> float:
    """The instance's tickcast_predictions_published_total, read from its /metrics; 0 while
    the scrape times out (a loaded machine: the caller polls again until its deadline)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{daemon.port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except TimeoutError:
        return 0.0
    except urllib.error.URLError as error:  # a connect that timed out comes wrapped
        if isinstance(error.reason, TimeoutError):
            return 0.0
        raise
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "tickcast_predictions_published_total":
                return float(sample.value)
    return 0.0


@pytest.fixture(scope="module")
def sasl_broker(tmp_path_factory) -> Iterator[tuple[str, str]]:
    """A second broker with a SASL/PLAIN listener (user tickcast / secret)."""
    sasl_port, plain_port, controller_port = pick_free_ports(3)
    jaas = (
        "org.apache.kafka.common.security.plain.PlainLoginModule required "
        'username="admin" password="admin-secret" '
        'user_admin="admin-secret" user_tickcast="tickcast-secret";'
    )
    broker = KafkaBroker(
        Path(tmp_path_factory.mktemp("sasl-kafka")),
        port=plain_port,
        controller_port=controller_port,
        extra_properties={
            "listeners": (
                f"PLAINTEXT://127.0.0.1:{plain_port},SASL_PLAINTEXT://127.0.0.1:{sasl_port},"
                f"CONTROLLER://127.0.0.1:{controller_port}"
            ),
            "advertised.listeners": (
                f"PLAINTEXT://127.0.0.1:{plain_port},SASL_PLAINTEXT://127.0.0.1:{sasl_port}"
            ),
            "listener.security.protocol.map": (
                "PLAINTEXT:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT,CONTROLLER:PLAINTEXT"
            ),
            "sasl.enabled.mechanisms": "PLAIN",
            "listener.name.sasl_plaintext.plain.sasl.jaas.config": jaas,
        },
    )
    broker.start()
    try:
        yield broker.bootstrap, f"127.0.0.1:{sasl_port}"
    finally:
        broker.stop()


async def test_daemon_over_sasl_plain(sasl_broker, tmp_path):
    from tests.support.daemon import make_checkpoint, produce, tick_records

    plain, sasl = sasl_broker
    topics = {k: f"{k}-{uuid4().hex[:8]}" for k in ("input", "output", "dlq")}
    await create_topics(plain, list(topics.values()))
    make_checkpoint(tmp_path / "ck")
    settings = daemon_settings(
        sasl,
        topics,
        tmp_path / "ck",
        f"g-{uuid4().hex[:6]}",
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="PLAIN",
        sasl_username="tickcast",
        sasl_password="tickcast-secret",
    )
    assert "tickcast-secret" not in repr(settings)  # a SecretStr never prints
    series = load_many(["dataset:nasdaq"])[0]
    async with running_daemon(settings):
        await produce(
            plain,
            topics["input"],
            tick_records(["NDX"] * 70, series.prices[-70:].tolist(), series.ts[-70:].tolist()),
        )
        predictions = await consume(plain, topics["output"], 11, timeout_s=60)
    assert [p.ts for p in predictions] == series.ts[-11:].tolist()


def test_retrain_from_kafka_connects_with_the_daemons_sasl_settings(
    sasl_broker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``retrain --from-kafka`` reads the same TICKCAST_* security variables as the
    daemon (the Kubernetes CronJob's cluster speaks SASL only); a wrong password is a
    clear exit 2, not a hang."""
    from model.__main__ import main as retrain_main
    from model.checkpoint import read_latest, read_meta
    from tests.support.daemon import produce, tick_records

    plain, sasl = sasl_broker
    topic = f"ticks-{uuid4().hex[:8]}"
    series = load_many(["dataset:nasdaq"])[0]
    n = 200

    async def fill() -> None:
        await create_topics(plain, [topic])
        ticks = tick_records(["NDX"] * n, series.prices[-n:].tolist(), series.ts[-n:].tolist())
        await produce(plain, topic, ticks)

    asyncio.run(fill())
    for name, value in {
        "BOOTSTRAP_SERVERS": sasl,
        "INPUT_TOPIC": topic,
        "SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "SASL_MECHANISM": "PLAIN",
        "SASL_USERNAME": "tickcast",
        "SASL_PASSWORD": "wrong",
    }.items():
        monkeypatch.setenv(f"TICKCAST_{name}", value)
    root = tmp_path / "checkpoints"
    argv = ["--from-kafka", "--checkpoint-dir", str(root), "--no-progress", "--epochs", "1"]
    argv += ["--hidden-size", "8", "--device", "cpu"]

    assert retrain_main(argv) == 2
    assert f"cannot read {topic} from {sasl}" in capsys.readouterr().err
    assert read_latest(root) is None

    monkeypatch.setenv("TICKCAST_SASL_PASSWORD", "tickcast-secret")
    assert retrain_main(argv) == 0, capsys.readouterr().err
    version = read_latest(root)
    assert version is not None
    [trained_on] = read_meta(root / version).training_data
    assert (trained_on.symbol, trained_on.source) == ("NDX", f"kafka:{topic}")


def test_demo_on_an_existing_kafka_connects_every_client_with_sasl(sasl_broker, tmp_path):
    """``tickcast demo --bootstrap-servers`` on a SASL-only listener: the daemon, the
    topic creation, the replay producer and the view's consumer all use the TICKCAST_*
    security settings (three of them once connected without)."""
    import json
    import os
    import subprocess
    import sys

    from tests.support.daemon import free_port, make_checkpoint

    _, sasl = sasl_broker
    make_checkpoint(tmp_path / "ck")
    suffix = uuid4().hex[:8]
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
        "TICKCAST_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "TICKCAST_SASL_MECHANISM": "PLAIN",
        "TICKCAST_SASL_USERNAME": "tickcast",
        "TICKCAST_SASL_PASSWORD": "tickcast-secret",
        **{
            f"TICKCAST_{name}_TOPIC": f"{name.lower()}-{suffix}"
            for name in ("INPUT", "OUTPUT", "DLQ", "STATE")
        },
    }
    summary_path = tmp_path / "summary.json"
    done = subprocess.run(
        [
            sys.executable, "-m", "daemon.demo", "--headless", "--duration", "8",
            "--bootstrap-servers", sasl, "--checkpoint-dir", str(tmp_path / "ck"),
            "--summary-json", str(summary_path), "--metrics-port", str(free_port()),
            "--device", "cpu",
        ],
        env=env, capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads(summary_path.read_text())
    assert summary["broker"] == "external"
    assert summary["predictions"] > 0
    assert summary["predictions"] == summary["predictions_published"]


async def test_wrong_sasl_password_fails_start_with_a_clear_error(sasl_broker, tmp_path):
    from aiokafka.errors import KafkaError

    from daemon.service import TickcastService
    from tests.support.daemon import make_checkpoint

    _, sasl = sasl_broker
    make_checkpoint(tmp_path / "ck")
    topics = {"input": "i", "output": "o", "dlq": "d"}
    settings = daemon_settings(
        sasl,
        topics,
        tmp_path / "ck",
        "g",
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="PLAIN",
        sasl_username="tickcast",
        sasl_password="wrong",
    )
    service = TickcastService(settings)
    with pytest.raises(KafkaError):
        await service.startup()
    await service.shutdown()
