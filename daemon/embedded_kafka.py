"""A single-node Apache Kafka broker (KRaft) started with ``java``, no Docker.

The broker is Apache Kafka itself, assembled from its Maven Central artifacts by
``deploy/kafka/pom.xml``. The test suite runs one for the whole session and
``tickcast demo`` runs one for the quickstart::

    with KafkaBroker(tmp_dir) as broker:
        asyncio.run(create_topics(broker.bootstrap, ["ticks", "predictions"]))
        ...

Topics are not auto-created (``auto.create.topics.enable=false``): a typo in a topic name
fails loudly instead of silently creating an empty topic; create them with
:func:`create_topics`.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
import weakref
from collections import deque
from collections.abc import Coroutine, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError, for_code

logger = logging.getLogger(__name__)

KAFKA_VERSION = "4.1.1"
LIBS_ENV_VAR = "TICKCAST_KAFKA_LIBS"
POM_PATH = Path(__file__).resolve().parents[1] / "deploy" / "kafka" / "pom.xml"

NODE_ID = 1
HOST = "127.0.0.1"
# Small heap: the broker shares a 2-core CI machine with the daemon and the tests.
JVM_OPTIONS = ("-Xms256m", "-Xmx512m", "-XX:+UseG1GC", "-Djava.awt.headless=true")

# WARN and above to stderr, which start() sends to the broker log file.
LOG4J2_PROPERTIES = """\
status = warn
shutdownHook = disable
appender.stderr.type = Console
appender.stderr.name = STDERR
appender.stderr.target = SYSTEM_ERR
appender.stderr.layout.type = PatternLayout
appender.stderr.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.stderr.ref = STDERR
"""

_T = TypeVar("_T")


class BrokerError(RuntimeError):
    """The embedded broker could not be assembled, started or reached."""


def default_libs_dir() -> Path:
    """``$TICKCAST_KAFKA_LIBS``, else ``~/.cache/tickcast/kafka-<version>/libs``."""
    override = os.environ.get(LIBS_ENV_VAR)
    if override:
        return Path(override).expanduser()
    return Path.home() / ".cache" / "tickcast" / f"kafka-{KAFKA_VERSION}" / "libs"


def _has_jars(directory: Path) -> bool:
    return directory.is_dir() and any(directory.glob("*.jar"))


def ensure_kafka_jars(cache_dir: Path | None = None) -> Path:
    """Return the directory holding the Kafka broker's jars, assembling it if needed.

    ``cache_dir`` is that directory (default: :func:`default_libs_dir`). When it holds no
    jars, Maven copies the runtime dependencies of ``deploy/kafka/pom.xml`` into it; the
    copy goes to a sibling temp dir first and is renamed into place, so a concurrent or
    interrupted run never leaves a half-filled directory behind.
    """
    libs_dir = cache_dir if cache_dir is not None else default_libs_dir()
    if _has_jars(libs_dir):
        return libs_dir
    _find_java()  # fail early: the jars are useless without it
    mvn = shutil.which("mvn")
    if mvn is None:
        raise BrokerError(
            f"Kafka's jars are missing from {libs_dir} and Maven (mvn) is not on PATH; "
            f"install Maven, or set {LIBS_ENV_VAR} to a directory holding the jars"
        )
    if not POM_PATH.is_file():
        raise BrokerError(
            f"Kafka's jars are missing from {libs_dir} and {POM_PATH} does not exist "
            f"(not a source checkout?); set {LIBS_ENV_VAR} to a directory holding the jars"
        )
    libs_dir.parent.mkdir(parents=True, exist_ok=True)
    logger.info("Assembling Apache Kafka %s jars into %s with Maven", KAFKA_VERSION, libs_dir)
    staging = Path(tempfile.mkdtemp(prefix=f".{libs_dir.name}-", dir=libs_dir.parent))
    try:
        command = [
            mvn,
            "-q",
            "-B",
            "-f",
            str(POM_PATH),
            "dependency:copy-dependencies",
            "-DincludeScope=runtime",
            f"-DoutputDirectory={staging}",
        ]
        result = subprocess.run(
            command, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False
        )
        if result.returncode != 0 or not _has_jars(staging):
            output = "\n".join((result.stdout + result.stderr).splitlines()[-40:])
            raise BrokerError(
                f"`{' '.join(command)}` failed with exit code {result.returncode}:\n{output}"
            )
        if libs_dir.is_dir() and not any(libs_dir.iterdir()):
            libs_dir.rmdir()
        try:
            staging.rename(libs_dir)
        except OSError:
            if not _has_jars(libs_dir):  # not a concurrent run that got there first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return libs_dir


def _find_java() -> str:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").is_file():
        return str(Path(java_home) / "bin" / "java")
    java = shutil.which("java")
    if java is None:
        raise BrokerError(
            "Java (17 or later) is needed to run Apache Kafka, and `java` is not on PATH"
        )
    return java


def pick_free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports that are free on 127.0.0.1 right now."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind((HOST, 0))  # all held open at once, so the ports are distinct
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def random_cluster_id() -> str:
    """A KRaft cluster id: a random UUID as 22 characters of URL-safe base64."""
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode("ascii").rstrip("=")


def kill_process(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL a broker process that is still running, and reap it."""
    if process.poll() is None:
        process.kill()
        process.wait()


class BrokerProcess:
    """What the embedded brokers (Apache Kafka here, Tansu in :mod:`daemon.tansu`) have in
    common: an address on HOST, a process whose output goes to ``work_dir/LOG_NAME``, a
    launch that waits until the broker serves clients, and a stop that is safe to call
    twice. Subclasses write ``start()`` and the readiness probe."""

    NAME = "broker"  # starts its messages: "Kafka broker on 127.0.0.1:9092: ..."
    LOG_NAME = "broker.log"

    def __init__(self, work_dir: Path, port: int) -> None:
        self.work_dir = Path(work_dir)
        self.port = port
        self._process: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize | None = None

    @property
    def bootstrap(self) -> str:
        """The address for clients' ``bootstrap_servers``."""
        return f"{HOST}:{self.port}"

    @property
    def log_path(self) -> Path:
        """The broker process's stdout and stderr, across restarts."""
        return self.work_dir / self.LOG_NAME

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def log_tail(self, n_lines: int = 50) -> str:
        """The last ``n_lines`` of :attr:`log_path` ('' when there is none yet)."""
        try:
            with self.log_path.open("r", encoding="utf-8", errors="replace") as log:
                return "".join(deque(log, maxlen=n_lines))
        except FileNotFoundError:
            return ""

    def start(self, timeout_s: float = 60.0) -> None:
        raise NotImplementedError

    async def _serves_clients(self, timeout_s: float) -> bool:
        """One readiness probe: True once the broker answers as a usable broker."""
        raise NotImplementedError

    def _log_line(self, text: str) -> None:
        with self.log_path.open("ab") as log:
            log.write(f"--- tickcast: {text} ---\n".encode())

    def _launch(
        self, command: list[str], deadline: float, env: Mapping[str, str] | None = None
    ) -> None:
        """Start ``command`` as the broker and wait until it serves clients (or raise
        :class:`BrokerError`, with the end of its log, and leave nothing running)."""
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.work_dir,
                env=env,
                # Not in the terminal's process group: on Ctrl-C the caller shuts its
                # clients down first and then stops the broker, in that order.
                start_new_session=True,
            )
        # A broker left behind by a crashed caller would hold its ports and memory.
        self._finalizer = weakref.finalize(self, kill_process, self._process)
        try:
            self._wait_until_ready(deadline)
        except BaseException:
            self.stop(timeout_s=5.0)
            raise

    def _wait_until_ready(self, deadline: float) -> None:
        # An open port is not enough: the broker must answer a metadata request as itself.
        process = self._process
        assert process is not None
        last_error: BaseException | None = None
        while True:
            returncode = process.poll()
            if returncode is not None:
                raise BrokerError(self._failure(f"the broker exited with code {returncode}"))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                reason = f"not ready before the timeout (last error: {last_error!r})"
                raise BrokerError(self._failure(reason))
            if port_open(self.port):
                try:
                    if _run_blocking(self._serves_clients(min(remaining, 5.0))):
                        return
                except Exception as error:
                    last_error = error
            time.sleep(0.05)

    def _failure(self, reason: str) -> str:
        return f"{self.NAME} on {self.bootstrap}: {reason}. End of {self.log_path}:\n" + (
            self.log_tail(40) or "(empty)"
        )

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM (a clean shutdown), then SIGKILL after ``timeout_s``. Safe to call twice."""
        process, self._process = self._process, None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            logger.warning("%s did not stop within %.0f s; killing it", self.NAME, timeout_s)
            process.kill()
            process.wait()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


class KafkaBroker(BrokerProcess):
    """One Apache Kafka process acting as both KRaft controller and broker.

    Everything lives in ``work_dir``: ``server.properties``, ``log4j2.properties``, the
    data (``data/``) and the process output (``broker.log``). Ports are fixed when the
    object is built, so :meth:`restart` brings the broker back at the same address with
    the same topics, records and committed offsets.
    """

    NAME = "Kafka broker"

    def __init__(
        self,
        work_dir: Path,
        port: int | None = None,
        controller_port: int | None = None,
        libs_dir: Path | None = None,
        extra_properties: Mapping[str, str] | None = None,
    ) -> None:
        free = iter(pick_free_ports([port, controller_port].count(None)))
        super().__init__(work_dir, port if port is not None else next(free))
        self.controller_port = controller_port if controller_port is not None else next(free)
        if self.port == self.controller_port:
            raise ValueError(f"port and controller_port are both {self.port}")
        self._libs_dir = libs_dir
        self._extra_properties = dict(extra_properties or {})

    @property
    def data_dir(self) -> Path:
        return self.work_dir / "data"

    def server_properties(self) -> dict[str, str]:
        """The broker configuration that :meth:`start` writes to ``server.properties``."""
        properties = {
            "process.roles": "broker,controller",
            "node.id": str(NODE_ID),
            "controller.quorum.voters": f"{NODE_ID}@{HOST}:{self.controller_port}",
            "listeners": f"PLAINTEXT://{HOST}:{self.port},CONTROLLER://{HOST}:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://{HOST}:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(self.data_dir),
            "num.partitions": "1",
            "auto.create.topics.enable": "false",
            # One node: every internal topic has a single replica.
            "offsets.topic.replication.factor": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            # Fewer internal partitions: the first group or transaction is ready sooner.
            "offsets.topic.num.partitions": "1",
            "transaction.state.log.num.partitions": "1",
            # Nobody else is joining: don't hold the first rebalance back 3 s.
            "group.initial.rebalance.delay.ms": "0",
        }
        properties.update(self._extra_properties)
        return properties

    def start(self, timeout_s: float = 60.0) -> None:
        """Format storage on first use, launch the broker and wait until it serves metadata.

        Blocks. Raises :class:`BrokerError`, with the end of the broker log, when the
        process exits or no metadata request succeeds within ``timeout_s``. Async callers
        should use ``await asyncio.to_thread(broker.start)``.
        """
        if self.is_running:
            return
        started = time.monotonic()
        deadline = started + timeout_s
        java = _find_java()
        libs_dir = self._libs_dir if self._libs_dir is not None else ensure_kafka_jars()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        config_path = self.work_dir / "server.properties"
        config_path.write_text(
            "".join(f"{key}={value}\n" for key, value in self.server_properties().items()),
            encoding="utf-8",
        )
        log4j_path = self.work_dir / "log4j2.properties"
        log4j_path.write_text(LOG4J2_PROPERTIES, encoding="utf-8")
        java_command = [
            java,
            *JVM_OPTIONS,
            f"-Dlog4j2.configurationFile={log4j_path}",
            "-cp",
            str(libs_dir / "*"),
        ]
        self._log_line(f"starting Kafka on {self.bootstrap}")
        if not (self.data_dir / "meta.properties").exists():
            self._format_storage(java_command, config_path, deadline)
        self._launch([*java_command, "kafka.Kafka", str(config_path)], deadline)
        logger.info(
            "Kafka broker ready on %s in %.1f s", self.bootstrap, time.monotonic() - started
        )

    def _format_storage(self, java_command: list[str], config_path: Path, deadline: float) -> None:
        # controller.quorum.voters is set (a static quorum), so no --standalone.
        command = [
            *java_command,
            "kafka.tools.StorageTool",
            "format",
            # "=" form: a base64 id may start with "-", which argparse would take for a flag.
            f"--cluster-id={random_cluster_id()}",
            "--config",
            str(config_path),
            "--ignore-formatted",
        ]
        try:
            with self.log_path.open("ab") as log:
                returncode = subprocess.run(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.work_dir,
                    timeout=max(deadline - time.monotonic(), 1.0),
                    check=False,
                ).returncode
        except subprocess.TimeoutExpired:
            raise BrokerError(self._failure("formatting its storage timed out")) from None
        if returncode != 0:
            raise BrokerError(self._failure(f"formatting its storage failed (exit {returncode})"))

    async def _serves_clients(self, timeout_s: float) -> bool:
        # Registered with its controller, and itself the controller: a usable cluster.
        return await _broker_registered(self.bootstrap, timeout_s)

    def restart(self, timeout_s: float = 60.0) -> None:
        """Stop and start again: same ports, same data."""
        self.stop()
        self.start(timeout_s=timeout_s)


def port_open(port: int) -> bool:
    """Whether something accepts TCP connections on HOST:port."""
    with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.5):
        return True
    return False


def _run_blocking(coroutine: Coroutine[Any, Any, _T]) -> _T:
    """Run ``coroutine`` to completion from sync code, even under a running event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


async def _broker_registered(bootstrap: str, timeout_s: float) -> bool:
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap, request_timeout_ms=max(int(timeout_s * 1000), 1000)
    )
    try:
        async with asyncio.timeout(timeout_s):
            await admin.start()
            cluster = await admin.describe_cluster()
    finally:
        await admin.close()
    node_ids = {broker["node_id"] for broker in cluster["brokers"]}
    return NODE_ID in node_ids and cluster["controller_id"] == NODE_ID


async def create_topics(
    bootstrap: str,
    names: Iterable[str],
    partitions: int = 1,
    config: Mapping[str, str] | None = None,
    *,
    replication_factor: int = 1,
    timeout_s: float = 30.0,
    client_kwargs: Mapping[str, Any] | None = None,
) -> None:
    """Create topics (existing ones are left as they are) and wait until every partition
    has a leader, so producers and consumers can use them at once. ``client_kwargs``:
    the connection's security settings (``Settings.client_kwargs()``)."""
    names = list(names)
    if not names:
        return
    deadline = time.monotonic() + timeout_s
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap,
        request_timeout_ms=int(timeout_s * 1000),
        **dict(client_kwargs or {}),
    )
    try:
        await admin.start()
        new_topics = [
            NewTopic(name, partitions, replication_factor, topic_configs=dict(config or {}))
            for name in names
        ]
        response = await admin.create_topics(new_topics, timeout_ms=int(timeout_s * 1000))
        for name, error_code, *details in response.topic_errors:
            error_type = for_code(error_code) if error_code else None
            if error_type is not None and error_type is not TopicAlreadyExistsError:
                message = details[0] if details and details[0] else ""
                raise error_type(f"could not create topic {name!r}: {message}")
        await _wait_for_leaders(admin, names, deadline)
    finally:
        await admin.close()


async def _wait_for_leaders(admin: AIOKafkaAdminClient, names: list[str], deadline: float) -> None:
    pending = set(names)
    while True:
        for topic in await admin.describe_topics(sorted(pending)):
            partitions = topic["partitions"]
            if (
                topic["error_code"] == 0
                and partitions
                and all(p["error_code"] == 0 and p["leader"] >= 0 for p in partitions)
            ):
                pending.discard(topic["topic"])
        if not pending:
            return
        if time.monotonic() > deadline:
            raise BrokerError(f"topics without a partition leader: {sorted(pending)}")
        await asyncio.sleep(0.1)
