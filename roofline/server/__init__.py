"""The OpenAI-compatible HTTP server: `create_app(engine, config)` and `roofline serve`."""

from roofline.server.app import create_app
from roofline.server.config import ServerConfig

__all__ = ["create_app", "ServerConfig"]
