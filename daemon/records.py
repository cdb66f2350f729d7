"""The records the daemon writes: a prediction per scored window, a dead letter per tick it
cannot use. The output half of the message contract (``daemon.ticks`` reads the input)."""

from __future__ import annotations

import time

import numpy as np
import orjson

from daemon.pipeline import ScoringRows
from daemon.publisher import OutRecord
from daemon.ticks import BadTick, json_numbers

# Original headers a dead letter keeps, in bytes; more are dropped and counted.
DLQ_MAX_HEADER_BYTES = 64 * 1024


def prediction_records(
    rows: ScoringRows, predictions: np.ndarray, model_version: str
) -> list[OutRecord]:
    """One prediction record per row: key = symbol; value = JSON with symbol, ts, price,
    predicted, model_version, produced_at; headers model_version, input_partition and
    input_offset.

    This runs on the event loop for every tick, so whatever can be done per batch is: the
    fields all rows share (model version, produced_at) and the partition headers are
    encoded once, and the prices are formatted by orjson over whole arrays (the same text
    it writes for each float on its own); per row only the symbol is encoded and the value
    assembled with one %-format.
    """
    shared_fields = orjson.dumps(
        {"model_version": model_version, "produced_at": int(time.time() * 1000)}
    )
    shared_tail = b"," + shared_fields[1:]  # ',"model_version":...,"produced_at":...}'
    version_header = ("model_version", model_version.encode())
    partition_headers = {
        p: ("input_partition", b"%d" % p) for p in np.unique(rows.partitions).tolist()
    }
    value = b'{"symbol":%b,"ts":%d,"price":%b,"predicted":%b%b'
    dumps = orjson.dumps
    return [
        (
            symbol.encode(),
            value % (dumps(symbol), ts, price, predicted, shared_tail),
            [version_header, partition_headers[partition], ("input_offset", b"%d" % offset)],
        )
        for symbol, ts, price, predicted, partition, offset in zip(
            rows.symbols.tolist(),
            rows.ts.tolist(),
            json_numbers(rows.prices),
            json_numbers(predictions),
            rows.partitions.tolist(),
            rows.offsets.tolist(),
            strict=True,
        )
    ]


def dead_letter_record(tick: BadTick, input_topic: str, max_value_bytes: int) -> OutRecord:
    """The bad tick's original key, value and headers, plus why it was refused
    (``tickcast.reason``, ``tickcast.detail``) and where it came from (``tickcast.source``
    = topic/partition/offset). A key or value over ``max_value_bytes`` is cut to it and its
    size kept in a header, so the dead letter itself stays under the broker's limit."""
    r = tick.record
    source = f"{input_topic}/{tick.partition}/{r.offset}"
    headers = [*list(r.headers or ())]
    # On the wire each header also costs its two lengths (varints, up to 5 bytes each).
    if sum(len(k.encode()) + len(v or b"") + 10 for k, v in headers) > DLQ_MAX_HEADER_BYTES:
        # The original's headers alone could push the dead letter over the broker's
        # limit: it would be refused and resent forever.
        headers = [("tickcast.headers_dropped", str(len(headers)).encode())]
    headers += [
        ("tickcast.reason", tick.reason.encode()),
        ("tickcast.detail", tick.detail.encode("utf-8", "replace")[:512]),
        ("tickcast.source", source.encode()),
    ]
    key, value = r.key, r.value or b""
    if len(value) > max_value_bytes:
        headers.append(("tickcast.value_bytes", str(len(value)).encode()))
        value = value[:max_value_bytes]
    if key is not None and len(key) > max_value_bytes:  # a key near the broker's limit, too
        headers.append(("tickcast.key_bytes", str(len(key)).encode()))
        key = key[:max_value_bytes]
    return (key, value, headers)
