"""/metrics, /healthz and /readyz on TICKCAST_METRICS_PORT (aiohttp, on the event loop).

Serving from the event loop itself is deliberate: if /healthz answers, the loop is alive.
"""

from __future__ import annotations

import logging
from typing import Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

logger = logging.getLogger(__name__)


class _Observable(Protocol):
    @property
    def metrics(self) -> object: ...

    def readiness(self) -> dict[str, bool]: ...


class HealthServer:
    """HTTP endpoints for Prometheus and for liveness/readiness probes."""

    def __init__(self, service: _Observable, host: str, port: int) -> None:
        self._service = service
        self._host = host
        self._port = port
        self._runner: web.AppRunner | None = None
        self.bound_port: int | None = None

    def _registry(self) -> CollectorRegistry:
        registry = self._service.metrics.registry  # type: ignore[attr-defined]
        assert isinstance(registry, CollectorRegistry)
        return registry

    async def _metrics(self, _: web.Request) -> web.Response:
        body = generate_latest(self._registry())
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, _: web.Request) -> web.Response:
        checks = self._service.readiness()
        ready = all(checks.values())
        return web.json_response({"ready": ready, **checks}, status=200 if ready else 503)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port, reuse_address=True)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.bound_port = sockets[0].getsockname()[1] if sockets else self._port
        logger.info("metrics on http://%s:%s/metrics", self._host, self.bound_port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
