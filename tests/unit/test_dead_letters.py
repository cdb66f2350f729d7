"""A dead letter keeps the original key, headers and (up to a bound) value, and says why."""

from __future__ import annotations

from aiokafka.structs import ConsumerRecord

from daemon.records import dead_letter_record
from daemon.settings import Settings
from daemon.ticks import BadTick


def dead_letter(
    value: bytes, limit: int | None = None
) -> tuple[bytes | None, bytes, dict[str, bytes]]:
    record = ConsumerRecord(
        "ticks", 3, 41, 0, 0, b"key", value, None, 0, len(value), [("trace", b"t-1")]
    )
    tick = BadTick(record, 3, "oversized", f"value is {len(value)} bytes")
    settings = Settings() if limit is None else Settings(dlq_max_value_bytes=limit)
    key, out, headers = dead_letter_record(tick, "ticks", settings.dlq_max_value_bytes)
    return key, out, dict(headers)


def test_the_original_travels_with_the_reason_and_source() -> None:
    key, value, headers = dead_letter(b"x" * 5000)
    assert (key, value) == (b"key", b"x" * 5000)
    assert headers["trace"] == b"t-1"
    assert headers["tickcast.reason"] == b"oversized"
    assert headers["tickcast.source"] == b"ticks/3/41"
    assert "tickcast.value_bytes" not in headers


def test_a_value_past_the_bound_is_cut_and_its_size_kept() -> None:
    # Near the broker's 1 MB message limit the original plus headers would be refused, and
    # a refused dead letter was resent forever, holding back every commit.
    original = bytes(range(256)) * 4000  # 1,024,000 bytes
    _, value, headers = dead_letter(original, limit=1000)
    assert value == original[:1000]
    assert headers["tickcast.value_bytes"] == b"1024000"
    _, value, _ = dead_letter(original)  # the default bound: 256 KiB
    assert len(value) == 256 * 1024
