"""APIError: a failure to return to the client in OpenAI's error shape (status, message, code, param).

Transport-free: the HTTP server turns it into its JSON error response (server/errors.py), `roofline batch`
into an error record.
"""

from __future__ import annotations


class APIError(Exception):
    """An error to return to the client as OpenAI's error JSON."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers or {}
