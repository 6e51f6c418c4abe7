"""Errors in OpenAI's body, {"error": {"message", "type", "param", "code"}}, with a status that says whose
fault it was, the outcome /metrics counts it under, and Retry-After where the same request can succeed
later (the queue is full, the server is stopping)."""

from dataclasses import dataclass

from starlette.responses import JSONResponse

# status -> OpenAI's error type
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
          413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}
_RETRY = (429, 503)
_LATER = ("queue_full", "shutting_down")  # the refusals a retry of the same request can get past


def outcome_of(status: int) -> str:
    """An answer's label in /metrics' request counter, from its status."""
    if 200 <= status < 400:
        return "ok"
    return "rejected" if status in _RETRY else "client_error" if 400 <= status < 500 else "server_error"


@dataclass
class APIError(Exception):
    status: int
    message: str
    code: str
    param: str | None = None

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": _TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), self.status, headers={"Retry-After": "1"} if self.code in _LATER else None)
