"""The OpenAI-compatible HTTP server: `create_app(engine, config)` and `roofline serve`."""

__all__ = ["create_app", "ServerConfig"]


def __getattr__(name: str):
    # on first use: importing FastAPI and the routes costs ~0.2 s, which `roofline generate` (it reads
    # only roofline.server.protocol, inside this package) need not pay
    if name == "create_app":
        from roofline.server.app import create_app

        return create_app
    if name == "ServerConfig":
        from roofline.server.config import ServerConfig

        return ServerConfig
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
