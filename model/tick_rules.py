"""What makes a price tick usable: one set of rules for the daemon's decoder (which
dead-letters the rest) and the retrain job's reader of the input topic (which skips them),
so that no tick trains a model that serving would refuse, or the reverse."""

from __future__ import annotations

import math
from typing import Any

import msgspec
import numpy as np
import orjson

# Event times must fit a float64 exactly and be after 1970; the upper bound (year ~2286)
# rejects values in micro- or nanoseconds, a common producer mistake.
MAX_TS_MS = 10**13
# The daemon's windows hold float32 prices: one outside float32's normal range would be
# stored as inf or 0 and poison the symbol's next 60 predictions.
MIN_PRICE = float(np.finfo(np.float32).tiny)
MAX_PRICE = float(np.finfo(np.float32).max)
# Defaults of TICKCAST_MAX_SYMBOL_LENGTH and TICKCAST_MAX_TICK_BYTES.
MAX_SYMBOL_LENGTH = 64
MAX_TICK_BYTES = 4096


class InvalidTickError(ValueError):
    """A decoded tick that breaks a rule: ``reason`` is a short metric label, the message
    a human-readable detail."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def validate_tick(obj: Any, max_symbol_length: int = MAX_SYMBOL_LENGTH) -> tuple[str, float, int]:
    """(symbol, price, ts) of one tick's parsed JSON value, or raise
    :class:`InvalidTickError`."""
    if not isinstance(obj, dict):
        raise InvalidTickError("not_object", f"value is a JSON {type(obj).__name__}, not an object")
    try:
        symbol, price, ts = obj["symbol"], obj["price"], obj["ts"]
    except KeyError as exc:
        raise InvalidTickError("missing_field", f"missing field {exc.args[0]!r}") from None
    if not isinstance(symbol, str) or not symbol or len(symbol) > max_symbol_length:
        raise InvalidTickError(
            "bad_symbol", f"symbol must be a non-empty string of at most {max_symbol_length} chars"
        )
    if not symbol.isprintable():
        raise InvalidTickError("bad_symbol", "symbol has non-printable characters")
    # bool is an int subclass in Python: true/false are neither prices nor times.
    if isinstance(price, bool) or not isinstance(price, int | float):
        raise InvalidTickError("bad_price", f"price must be a number, got {type(price).__name__}")
    price = float(price)
    if not math.isfinite(price) or price <= 0.0:
        raise InvalidTickError("bad_price", f"price must be finite and positive, got {price!r}")
    if not MIN_PRICE <= price <= MAX_PRICE:
        raise InvalidTickError("bad_price", f"price {price!r} is outside the float32 range")
    if isinstance(ts, float) and ts.is_integer():
        ts = int(ts)
    if isinstance(ts, bool) or not isinstance(ts, int):
        raise InvalidTickError(
            "bad_ts", f"ts must be integer epoch milliseconds, got {type(ts).__name__}"
        )
    if not 0 < ts < MAX_TS_MS:
        raise InvalidTickError("bad_ts", f"ts {ts} is not epoch milliseconds")
    return symbol, price, ts


class _SchemaTick(msgspec.Struct, gc=False):
    """A tick's schema, checked in C while parsing: symbol a string, price a JSON number,
    ts a JSON integer (not a bool, not 1.0); unknown fields skipped unparsed."""

    symbol: str
    price: float
    ts: int


# Raises on anything that does not fit the schema; the daemon maps it over whole fetches.
parse_schema_tick = msgspec.json.Decoder(_SchemaTick).decode


def schema_tick(value: bytes, max_symbol_length: int) -> tuple[str, float, int] | None:
    """(symbol, price, ts) when ``value`` fits the schema and the rules, else None."""
    try:
        tick = parse_schema_tick(value)
        value.decode("utf-8")  # msgspec skips unknown fields without checking their UTF-8
    except Exception:
        return None
    symbol, price, ts = tick.symbol, tick.price, tick.ts
    if not 0 < len(symbol) <= max_symbol_length or not symbol.isprintable():
        return None
    if not (MIN_PRICE <= price <= MAX_PRICE and 0 < ts < MAX_TS_MS):
        return None
    return symbol, price, ts


def decode_tick_value(value: bytes, max_symbol_length: int) -> tuple[str, float, int]:
    """(symbol, price, ts) of one non-empty record value, or raise
    :class:`InvalidTickError`: the daemon's decoder and the retrain job's reader both call
    this, so they accept exactly the same ticks."""
    clean = schema_tick(value, max_symbol_length)
    if clean is not None:
        return clean
    # Not a tick the schema takes: orjson parses it to name the reason (or to accept what
    # the schema refuses, such as a ts of 1.0). Unknown fields are parsed here, so one
    # orjson refuses (a number like 1e999) makes the tick not JSON only if the schema
    # failed as well.
    try:
        obj = orjson.loads(value)
    except (orjson.JSONDecodeError, RecursionError) as exc:
        try:
            value.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidTickError("not_utf8", "value is not UTF-8") from None
        raise InvalidTickError("not_json", f"value is not JSON: {exc}"[:200]) from None
    return validate_tick(obj, max_symbol_length)
