"""What every route needs: the engine client, the served config, metrics, and which model(s) an app
serves (all of them on the main port; exactly one on a per-model port)."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

from modelhive.engine.client import AsyncEngine
from modelhive.engine.engine import LoadedModel
from modelhive.errors import InvalidRequestError, ModelNotFoundError
from modelhive.server.errors import APIError
from modelhive.server.metrics import ServerMetrics

#: default limit on a request body (bytes); larger bodies get 413 before they are parsed
DEFAULT_MAX_BODY_BYTES = 8 * 2**20


_PATH = re.compile(r"(?<![\w.])(?:~|\.{1,2})?/[^\s'\"]+")


def _without_paths(text: str) -> str:
    return _PATH.sub("<path>", text)


@dataclass(frozen=True)
class ServedConfig:
    """Where the server listens: the main port serves every model, ``model_ports`` one each."""

    host: str = "127.0.0.1"
    port: int = 8000
    model_ports: Mapping[str, int] = field(default_factory=dict)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES

    @classmethod
    def from_hive_config(cls, config, host: str | None = None, port: int | None = None,
                         max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> ServedConfig:
        """From a ``HiveConfig``; ``host``/``port`` (CLI flags) override the file's values."""
        return cls(host=host or config.host or "127.0.0.1", port=port or config.port or 8000,
                   model_ports={m.name: m.port for m in config.models if m.port is not None},
                   max_body_bytes=max_body_bytes)


@dataclass
class ServerState:
    async_engine: AsyncEngine
    served: ServedConfig
    metrics: ServerMetrics
    #: set on a per-model port: the only model this app serves
    fixed_model: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def model_names(self) -> list[str]:
        if self.fixed_model is not None:
            return [self.fixed_model]
        return list(self.async_engine.engine.models)

    def resolve_model(self, requested: str | None) -> str:
        """The model a request names; raises 404 (unknown / not on this port) or 400 (missing)."""
        models = self.async_engine.engine.models
        if self.fixed_model is not None:
            if requested is None or requested == self.fixed_model:
                return self.fixed_model
            if requested in models:
                raise APIError(
                    404, f"Port {self.served.model_ports.get(self.fixed_model)} serves only the model "
                    f"'{self.fixed_model}', not '{requested}'; send requests for '{requested}' to "
                    f"port {self.served.port} (every model) or to its own port",
                    param="model", code="model_not_found")
            raise APIError(404, f"The model '{requested}' does not exist. This port serves only "
                           f"'{self.fixed_model}'", param="model", code="model_not_found")
        failed = self.async_engine.engine.failed_models
        if requested in failed:
            raise APIError(503, f"The model '{requested}' failed to load at startup and is not "
                           "served; see /health, and fix its source and restart the server",
                           "service_unavailable_error", param="model", code="model_not_loaded")
        if requested is None:
            if len(models) == 1:
                return next(iter(models))
            raise InvalidRequestError(
                f"model is required when several models are served ({', '.join(models)})",
                param="model")
        if requested not in models:
            raise ModelNotFoundError(requested, list(models))
        return requested

    def loaded(self, name: str) -> LoadedModel:
        return self.async_engine.engine.model(name)

    @property
    def failed_models(self) -> list[dict[str, str]]:
        """Models left out at startup (``--skip-failed-models``), for /health and /v1/models. The
        reason is the loader's one line with file paths replaced, so no path reaches a client."""
        if self.fixed_model is not None:
            return []
        return [{"id": name, "error": _without_paths(reason)}
                for name, reason in self.async_engine.engine.failed_models.items()]

    def check_healthy(self) -> None:
        if not self.async_engine.healthy:
            raise APIError(503, f"The engine is not running ({self.async_engine.error or 'stopped'});"
                           " restart the server", "service_unavailable_error",
                           code="service_unavailable")

    @staticmethod
    def new_id(prefix: str) -> str:
        return f"{prefix}-{uuid.uuid4().hex}"
