"""What every request passes on its way to a route and back (pure ASGI, outermost first):

    Outcomes    the last resort and the count: an exception no route turned into an APIError becomes
                one line on stderr and a 500 in OpenAI's body (never a traceback), and every chat
                completion is counted once in /metrics, under the outcome its Completion left in
                scope["state"] or else its status's
    HostCheck   DNS rebinding: refuses (403) a Host header that is not a loopback name or address, or
                one of --allowed-host; on when the server is bound to a loopback address
    (CORS)      starlette's CORSMiddleware, only with --cors-origin: no CORS header otherwise
    BearerAuth  with an API key: 401 without `Authorization: Bearer <key>`, except /health and the page
"""

import hmac
import ipaddress
import sys
import traceback
from pathlib import Path

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llavarad.serve.api_error import APIError, outcome_of
from llavarad.serve.prometheus import Metrics

COUNTED = "/v1/chat/completions"
OPEN_PATHS, OPEN_PREFIX = ("/health", "/", "/favicon.ico"), "/static/"  # the page loads without the key, then asks for it


class Outcomes:
    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 0

        async def watched(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception as e:
            where = traceback.extract_tb(e.__traceback__)[-1]  # where, not what: a message may quote the request
            print(f"error: {scope['method']} {scope['path']}: {type(e).__name__} at {Path(where.filename).name}:{where.lineno}",
                  file=sys.stderr)
            if not status:  # else the answer is under way and can only be cut
                error = APIError(500, f"the server failed ({type(e).__name__}); its log says where", "server_error")
                await error.response()(scope, receive, watched)
        if scope["path"] == COUNTED:
            self.metrics.requests.labels(scope.get("state", {}).get("outcome") or outcome_of(status)).inc()


def _host_name(host: str) -> str:
    """'127.0.0.1:8000' -> '127.0.0.1', '[::1]:8000' -> '::1', 'Example.com.' -> 'example.com'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0].rstrip(".") if ":" in host else host.rstrip(".")


def is_loopback(name: str) -> bool:
    """A host name or address that only ever means this machine (browsers resolve *.localhost themselves)."""
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class HostCheck:
    """A page on another site can point its own name at 127.0.0.1 (DNS rebinding) and then call this server
    as if same-origin; its requests still carry that name in Host, so a name that is neither loopback
    nor allowed is refused. A request without Host (HTTP/1.0) comes from no browser and passes."""

    def __init__(self, app: ASGIApp, allowed: tuple[str, ...]):
        self.app, self.allowed = app, {_host_name(h) for h in allowed}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        host = dict(scope.get("headers", [])).get(b"host")
        if scope["type"] == "http" and host is not None:
            name = _host_name(host.decode("latin-1"))
            if not is_loopback(name) and name not in self.allowed:
                error = APIError(403, f"Host {name[:100]!r} is not allowed: this server listens on a loopback address; "
                                      f"start it with --allowed-host {name[:100]} to accept that name", "host_not_allowed")
                return await error.response()(scope, receive, send)
        await self.app(scope, receive, send)


class BearerAuth:
    """Answers 401 to any request without the right `Authorization: Bearer <key>`, except the public paths."""

    def __init__(self, app: ASGIApp, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self._allowed(scope):
            error = APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "invalid_api_key")
            response = error.response()
            response.headers["WWW-Authenticate"] = "Bearer"
            return await response(scope, receive, send)
        await self.app(scope, receive, send)

    def _allowed(self, scope: Scope) -> bool:
        if scope["path"] in OPEN_PATHS or scope["path"].startswith(OPEN_PREFIX):
            return True
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)
