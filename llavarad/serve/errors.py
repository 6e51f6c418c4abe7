"""Errors in OpenAI's body, {"error": {"message", "type", "code"}}, with a status that says whose fault it was."""

from dataclasses import dataclass

# status -> OpenAI's error type
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}


@dataclass
class APIError(Exception):
    status: int
    message: str
    code: str
    param: str | None = None

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": _TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}
