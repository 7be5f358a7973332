"""ServingContext: what every handler needs (engine, tokenizer, config, metrics), plus drain state."""

from __future__ import annotations

from dataclasses import dataclass, field

from roofline.engine.async_engine import AsyncEngine
from roofline.server.config import ServerConfig
from roofline.server.metrics import ServerMetrics


@dataclass
class DrainState:
    """Whether the server is draining, and how many API requests are in flight."""

    is_draining: bool = False  # set on SIGTERM: new API requests get 503
    num_in_flight: int = 0  # /v1 requests accepted and not yet answered in full


@dataclass
class ServingContext:
    """The engine and settings behind one app."""

    engine: AsyncEngine
    config: ServerConfig
    metrics: ServerMetrics
    drain: DrainState = field(default_factory=DrainState)

    @property
    def tokenizer(self):
        """The model's tokenizer (encode, decode, apply_chat_template, token_text)."""
        return self.engine.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        """The context limit in tokens."""
        return self.engine.engine.max_model_len
