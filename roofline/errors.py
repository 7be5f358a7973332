"""User-facing error types: each says what was wrong and what to do, in one line."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none), for one-line errors."""
    return (str(exc).splitlines() or [type(exc).__name__])[0]


class RooflineError(ValueError):
    """Base class of every error a user can cause; the CLI prints it as one line and exits 2."""


class ConfigError(RooflineError):
    """An invalid configuration value."""


class ModelLoadError(RooflineError):
    """A model path that is missing, unsupported, truncated or corrupt."""


class InvalidRequestError(RooflineError):
    """A bad prompt or sampling parameter."""


class ContextOverflowError(InvalidRequestError):
    """A prompt (plus requested tokens) longer than the model's context."""


class SLOUnattainableError(InvalidRequestError):
    """A latency target the engine predicts it cannot meet even when idle (the server answers 429)."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s  # predicted time until the engine is idle
