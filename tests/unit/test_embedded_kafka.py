"""The embedded broker's pure parts: configuration, ports, jar lookup, error reporting."""

from __future__ import annotations

import base64
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from daemon import embedded_kafka
from daemon.embedded_kafka import (
    BrokerError,
    KafkaBroker,
    ensure_kafka_jars,
    pick_free_ports,
    random_cluster_id,
)


def test_server_properties_describe_a_single_node_kraft_cluster(tmp_path: Path) -> None:
    broker = KafkaBroker(tmp_path, port=19092, controller_port=19093, libs_dir=tmp_path)
    properties = broker.server_properties()

    assert properties["process.roles"] == "broker,controller"
    assert properties["node.id"] == "1"
    assert properties["controller.quorum.voters"] == "1@127.0.0.1:19093"
    assert properties["listeners"] == "PLAINTEXT://127.0.0.1:19092,CONTROLLER://127.0.0.1:19093"
    assert properties["advertised.listeners"] == "PLAINTEXT://127.0.0.1:19092"
    assert properties["controller.listener.names"] == "CONTROLLER"
    assert properties["inter.broker.listener.name"] == "PLAINTEXT"
    assert properties["log.dirs"] == str(tmp_path / "data")
    assert properties["auto.create.topics.enable"] == "false"
    for single_replica in (
        "offsets.topic.replication.factor",
        "transaction.state.log.replication.factor",
        "transaction.state.log.min.isr",
    ):
        assert properties[single_replica] == "1"
    assert properties["group.initial.rebalance.delay.ms"] == "0"
    assert broker.bootstrap == "127.0.0.1:19092"


def test_extra_properties_override_and_extend(tmp_path: Path) -> None:
    broker = KafkaBroker(
        tmp_path,
        libs_dir=tmp_path,
        extra_properties={"auto.create.topics.enable": "true", "log.retention.ms": "1000"},
    )
    properties = broker.server_properties()
    assert properties["auto.create.topics.enable"] == "true"
    assert properties["log.retention.ms"] == "1000"


def test_picked_ports_are_distinct_and_free() -> None:
    ports = pick_free_ports(4)
    assert len(set(ports)) == 4
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))  # raises if something holds it


def test_broker_picks_its_own_distinct_ports(tmp_path: Path) -> None:
    broker = KafkaBroker(tmp_path, libs_dir=tmp_path)
    assert broker.port != broker.controller_port
    assert broker.bootstrap == f"127.0.0.1:{broker.port}"
    with pytest.raises(ValueError, match="both"):
        KafkaBroker(tmp_path, port=20000, controller_port=20000)


def test_cluster_id_is_22_chars_of_url_safe_base64_uuid() -> None:
    cluster_id = random_cluster_id()
    assert len(cluster_id) == 22
    assert len(base64.urlsafe_b64decode(cluster_id + "==")) == 16
    assert random_cluster_id() != cluster_id


def test_log_tail_returns_the_last_lines(tmp_path: Path) -> None:
    broker = KafkaBroker(tmp_path, libs_dir=tmp_path)
    assert broker.log_tail(5) == ""
    broker.log_path.write_text("".join(f"line {i}\n" for i in range(100)))
    assert broker.log_tail(3) == "line 97\nline 98\nline 99\n"


def child(code: str) -> subprocess.Popen[bytes]:
    """A Python child standing in for the broker process; returns once it prints 'ready'."""
    process = subprocess.Popen(
        [sys.executable, "-c", f"{code}\nprint('ready', flush=True)\ntime.sleep(120)"],
        stdout=subprocess.PIPE,
    )
    assert process.stdout is not None
    with process.stdout:
        assert process.stdout.readline() == b"ready\n"
    return process


def test_stop_terminates_the_process_and_is_safe_to_repeat(tmp_path: Path) -> None:
    broker = KafkaBroker(tmp_path, libs_dir=tmp_path)
    broker.stop()  # never started: nothing to do, nothing raised
    process = child("import time")
    broker._process = process
    assert broker.is_running
    broker.stop()
    assert process.returncode == -signal.SIGTERM  # a clean shutdown was asked for, and reaped
    assert not broker.is_running
    broker.stop()  # a second stop finds nothing left to stop
    assert process.returncode == -signal.SIGTERM and not broker.is_running


def test_stop_kills_a_process_that_ignores_sigterm(tmp_path: Path) -> None:
    broker = KafkaBroker(tmp_path, libs_dir=tmp_path)
    process = child("import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)")
    broker._process = process
    try:
        broker.stop(timeout_s=0.5)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not broker.is_running


def test_start_failure_reports_the_broker_log(tmp_path: Path) -> None:
    try:
        embedded_kafka._find_java()
    except BrokerError as error:  # failed, not skipped, as the suite's broker fixture does
        pytest.fail(f"this test needs java: {error}", pytrace=False)
    empty_libs = tmp_path / "libs"
    empty_libs.mkdir()
    broker = KafkaBroker(tmp_path / "work", libs_dir=empty_libs)

    with pytest.raises(BrokerError) as raised:
        broker.start(timeout_s=30)

    message = str(raised.value)
    assert broker.bootstrap in message
    # java's own complaint, read back from the log file
    assert "Could not find or load main class" in message
    assert not broker.is_running


def test_ensure_kafka_jars_keeps_an_assembled_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "kafka_2.13-4.1.1.jar").touch()

    def no_maven(*args: object, **kwargs: object) -> None:
        raise AssertionError("Maven must not run when the jars are there")

    monkeypatch.setattr(subprocess, "run", no_maven)
    assert ensure_kafka_jars(tmp_path) == tmp_path
    monkeypatch.setenv(embedded_kafka.LIBS_ENV_VAR, str(tmp_path))
    assert ensure_kafka_jars() == tmp_path


def test_ensure_kafka_jars_without_maven_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # neither java nor mvn
    monkeypatch.delenv("JAVA_HOME", raising=False)
    with pytest.raises(BrokerError, match="java"):
        ensure_kafka_jars(tmp_path / "libs")

    monkeypatch.setattr(embedded_kafka, "_find_java", lambda: "/usr/bin/java")
    with pytest.raises(BrokerError, match=r"Maven \(mvn\) is not on PATH"):
        ensure_kafka_jars(tmp_path / "libs")
