"""One set of tick rules (model.tick_rules): the daemon's decoder and the retrain job's
reader of the input topic take and refuse the same ticks, for the same reasons."""

from __future__ import annotations

import json

import numpy as np
from aiokafka.structs import ConsumerRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.ticks import decode_ticks
from model.kafka_source import decode_tick
from model.tick_rules import MAX_SYMBOL_LENGTH, MAX_TICK_BYTES, MAX_TS_MS

# Field values around every rule's edges, and of every JSON type.
ANY_JSON = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=MAX_SYMBOL_LENGTH + 2),
    st.lists(st.integers(), max_size=2),
)
SYMBOLS = st.one_of(st.text(min_size=0, max_size=MAX_SYMBOL_LENGTH + 2), ANY_JSON)
PRICES = st.one_of(
    st.sampled_from([0.0, -0.0, -1.0, 1e-39, 1e39, 1.17e-38, 3.4e38, 312.45, 7]), ANY_JSON
)
TIMES = st.one_of(
    st.sampled_from([0, 1, 1.0, 1.5, MAX_TS_MS - 1, MAX_TS_MS, 1_704_205_800_000]), ANY_JSON
)
MISSING = object()


def daemon_verdict(value: bytes) -> tuple[str, float, int] | str:
    record = ConsumerRecord("ticks", 0, 0, 0, 0, None, value, None, 0, len(value), ())
    decoded, bad = decode_ticks(
        [record],
        np.zeros(1, np.int32),
        max_tick_bytes=MAX_TICK_BYTES,
        max_symbol_length=MAX_SYMBOL_LENGTH,
    )
    if bad:
        return bad[0].reason
    return decoded.symbols[0], float(decoded.prices[0]), int(decoded.ts[0])


@settings(max_examples=400, deadline=None)
@given(
    symbol=st.one_of(SYMBOLS, st.just(MISSING)),
    price=st.one_of(PRICES, st.just(MISSING)),
    ts=st.one_of(TIMES, st.just(MISSING)),
    top_level=st.booleans(),
)
def test_the_daemon_and_the_retrain_job_judge_every_tick_alike(
    symbol: object, price: object, ts: object, top_level: bool
) -> None:
    fields = {"symbol": symbol, "price": price, "ts": ts, "extra": [1, {"x": None}]}
    obj = {k: v for k, v in fields.items() if v is not MISSING}
    value = json.dumps(obj if top_level else [obj]).encode()  # orjson: no ints beyond 64 bits
    assert decode_tick(value) == daemon_verdict(value)


# Raw values the hypothesis test above cannot write through json.dumps: extra fields that
# the daemon's schema skips unparsed but orjson refuses, bytes that are not UTF-8, and
# JSON that is not a tick at all.
RAW_VALUES = [
    b'{"symbol": "A", "price": 2, "ts": 5, "x": 1e999}',  # taken by both (the field is skipped)
    b'{"symbol": "A", "price": 2, "ts": 5, "x": NaN}',
    b'{"symbol": "A", "price": 2, "ts": 5, "x": 99999999999999999999999}',
    b'{"symbol": "A", "price": 2, "ts": 5, "x": "\xff"}',
    b'{"symbol": "A", "price": 2, "ts": 5.0, "x": 1e999}',
    b'{"symbol": "A", "price": 1e999, "ts": 5}',
    b"\xff\xfe",
    b"{not json",
    b'{"symbol": "A", "price": 2, "ts": 5, "x": ' + b"[" * 5000 + b"]" * 5000 + b"}",
]


def test_the_daemon_and_the_retrain_job_judge_raw_values_alike() -> None:
    verdicts = [decode_tick(value) for value in RAW_VALUES]
    assert verdicts == [daemon_verdict(value) for value in RAW_VALUES]
    assert verdicts[0] == ("A", 2.0, 5)  # an unusable extra field does not spoil a tick
    assert verdicts[6] == "not_utf8"
