"""How to reach Kafka and which of its ticks to use: the ``TICKCAST_*`` settings the
daemon and the retrain job share, in one place.

The retrain job (``--from-kafka``) and the daemon connect to the same cluster with the
same credentials and must refuse the same ticks (no tick trains a model that serving
would refuse), so both read these variables through this class: the daemon's
``Settings`` extends it, and ``model`` never imports ``daemon``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from model.tick_rules import MAX_SYMBOL_LENGTH, MAX_TICK_BYTES

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]


class KafkaAccess(BaseSettings):
    """Bootstrap servers, the input topic and the security settings (environment first;
    callers pass CLI flags as keyword arguments, which override it)."""

    model_config = SettingsConfigDict(env_prefix="TICKCAST_", frozen=True, extra="ignore")

    bootstrap_servers: str = "localhost:9092"
    input_topic: str = "ticks"
    security_protocol: SecurityProtocol = "PLAINTEXT"
    sasl_mechanism: SaslMechanism | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = None

    # Input validation (model.tick_rules): larger or longer is dead-lettered by the daemon
    # and left out of training.
    max_tick_bytes: int = Field(default=MAX_TICK_BYTES, ge=64)
    max_symbol_length: int = Field(default=MAX_SYMBOL_LENGTH, ge=1)

    def client_kwargs(self) -> dict[str, Any]:
        """aiokafka connection arguments for the configured security protocol."""
        kwargs: dict[str, Any] = {"security_protocol": self.security_protocol}
        if self.sasl_mechanism:
            kwargs["sasl_mechanism"] = self.sasl_mechanism
            kwargs["sasl_plain_username"] = self.sasl_username
            if self.sasl_password is not None:
                kwargs["sasl_plain_password"] = self.sasl_password.get_secret_value()
        if self.security_protocol in ("SSL", "SASL_SSL"):
            from aiokafka.helpers import create_ssl_context

            kwargs["ssl_context"] = create_ssl_context(
                cafile=str(self.ssl_cafile) if self.ssl_cafile else None
            )
        return kwargs
