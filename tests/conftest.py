"""Suite-wide fixtures: the real Apache Kafka broker, random topics and consumer groups.

By default one broker (``daemon.embedded_kafka.KafkaBroker``) serves the whole session.
``TICKCAST_TEST_BOOTSTRAP=host:port`` points the suite at an existing broker instead; tests
that restart the broker are then skipped, since the suite does not own it.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Awaitable, Iterator, Mapping
from typing import Protocol
from uuid import uuid4

import pytest
from hypothesis import settings

from daemon.embedded_kafka import BrokerError, KafkaBroker, create_topics
from tests.support.processes import kill_leftovers

BOOTSTRAP_ENV_VAR = "TICKCAST_TEST_BOOTSTRAP"

# No per-example deadline (Hypothesis' default is 200 ms): on a loaded 2-core CI machine
# one stalled example would fail a property test that has nothing to do with speed.
settings.register_profile("tickcast", deadline=None)
settings.load_profile("tickcast")


class TopicFactory(Protocol):
    def __call__(
        self,
        partitions: int = 1,
        prefix: str = "ticks",
        config: Mapping[str, str] | None = None,
    ) -> Awaitable[str]: ...


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    """The session's broker, for tests that stop or restart it (leave it running)."""
    if os.environ.get(BOOTSTRAP_ENV_VAR):
        pytest.skip(f"{BOOTSTRAP_ENV_VAR} is set: the suite does not own that broker")
    broker = KafkaBroker(tmp_path_factory.mktemp("kafka"))
    try:
        broker.start()
    except BrokerError as error:
        failure = str(error)
    else:
        failure = ""
    if failure:  # failed, not skipped: a suite without its broker proves nothing
        pytest.fail(f"could not start the test Kafka broker: {failure}", pytrace=False)
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap(request: pytest.FixtureRequest) -> str:
    """``bootstrap_servers`` of the test broker."""
    external = os.environ.get(BOOTSTRAP_ENV_VAR)
    if external:
        return external
    broker: KafkaBroker = request.getfixturevalue("kafka_broker")
    return broker.bootstrap


@pytest.fixture
def topic_factory(kafka_bootstrap: str) -> TopicFactory:
    """``await topic_factory(partitions=3)``: a new, randomly named topic, ready to use."""

    async def create_topic(
        partitions: int = 1,
        prefix: str = "ticks",
        config: Mapping[str, str] | None = None,
    ) -> str:
        name = f"{prefix}-{uuid4().hex[:10]}"
        await create_topics(kafka_bootstrap, [name], partitions=partitions, config=config)
        return name

    return create_topic


@pytest.fixture
def unique_group() -> str:
    """A consumer group id no other test uses."""
    return f"group-{uuid4().hex[:10]}"


def pytest_unconfigure(config: pytest.Config) -> None:
    """Keep the test report the last thing the run prints.

    Training imports torch._dynamo, which loads Triton; Triton's nanobind bindings then
    print a "leaked functions" report to stderr while the interpreter tears modules down
    (an upstream issue, nothing of ours leaks). The report and exit status are final by
    then, so stderr goes to /dev/null from the interpreter's exit handlers on; atexit
    runs after pytest has restored its own capture of fd 2, and before that teardown.
    """

    def silence_stderr() -> None:
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)

    atexit.register(silence_stderr)


@pytest.fixture(autouse=True)
def _no_leftover_daemons() -> Iterator[None]:
    """A test that failed before stopping its child daemons leaves them running: kill them,
    or they go on fetching and take CPU from the tests after it on a 2-core machine."""
    yield
    kill_leftovers()
