"""Errors the server answers with: a status, and a message that names the field at fault."""

from __future__ import annotations


class APIError(Exception):
    """A request the server will not run, answered in OpenAI's error shape
    ({"error": {"message", "type", "param", "code"}}) or, on the TGI routes, as {"error": message}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _TYPES.get(status, "invalid_request_error")

    def openai(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def tgi(self) -> dict:
        return {"error": self.message, "error_type": self.type}


_TYPES = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
          429: "rate_limit_error", 500: "server_error", 503: "server_error"}
