"""How to reach Kafka: the ``TICKCAST_*`` connection settings, in one place.

The retrain job (``--from-kafka``) and the daemon connect to the same cluster with the
same credentials, so both read these variables through this class: the daemon's
``Settings`` extends it, and ``model`` never imports ``daemon``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

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
