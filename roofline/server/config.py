"""ServerConfig: what the HTTP layer needs to know beyond the engine."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from roofline.errors import ConfigError
from roofline.server.slo import SLOClass, TenantSpec, check_classes

DEFAULT_MAX_BODY_BYTES = 4 << 20


@dataclass
class ServerConfig:
    """Settings of the OpenAI-compatible server, validated on construction."""

    model_name: str  # the model id in responses and GET /v1/models
    model_aliases: tuple[str, ...] = ("default",)  # other names requests may use for the same model
    api_keys: tuple[str, ...] = ()  # bearer keys accepted on /v1/*; empty: no auth
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # larger request bodies get 413
    max_choices: int = 128  # prompts x n per request; more is a 400
    drain_timeout_s: float = 30.0  # after SIGTERM, how long in-flight requests may take to finish
    retry_after_s: int = 1  # Retry-After sent with 429 (queue full) and 503 (draining)
    created: int = field(default_factory=lambda: int(time.time()))  # reported as the model's creation time
    slo_classes: dict[str, SLOClass] = field(default_factory=dict)  # --slo-class: name -> targets and priority
    tenants: dict[str, TenantSpec] = field(default_factory=dict)  # --tenant: API key (or user) -> weight, class

    def __post_init__(self) -> None:
        if not self.model_name:
            raise ConfigError("server: model_name must not be empty")
        if any(not k for k in self.api_keys):
            raise ConfigError("server: an API key must not be empty")
        if self.max_body_bytes < 1024:
            raise ConfigError(f"server: max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        if self.max_choices < 1:
            raise ConfigError(f"server: max_choices must be >= 1, got {self.max_choices}")
        if self.drain_timeout_s < 0:
            raise ConfigError(f"server: drain_timeout_s must be >= 0, got {self.drain_timeout_s}")
        check_classes(self.slo_classes, self.tenants)
        if self.retry_after_s < 0:
            raise ConfigError(f"server: retry_after_s must be >= 0, got {self.retry_after_s}")

    def serves(self, name: str | None) -> bool:
        """True when a request's `model` names the served model (or is left out)."""
        return name is None or name == self.model_name or name in self.model_aliases
