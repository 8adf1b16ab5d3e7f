"""What stands before the HTTP API: header and body caps, the bearer token, open-request bounds.

`RequestGuard` is an ASGI middleware: it answers 431 to headers over their cap (before the token
is looked at), 401 to a `/v1/...` request without the right `Authorization: Bearer <token>`,
413 to a body over the cap before FastAPI reads a byte of it (a declared Content-Length is
refused at once; a chunked body is counted as it streams), 408 to a body that takes longer than
`body_timeout_s` to arrive, and 429 to a `/v1/...` request beyond `max_open_requests` held at
once. `/healthz`, `/readyz` and the OpenAPI pages stay open and uncounted, so slow or many
clients never starve them. Tokens are compared in constant time.
No Ray here: the Serve app passes a callable that returns the replica's `Guard`.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

from dermaflux.core.config import ConfigError, read_small_text

log = logging.getLogger(__name__)

MIN_TOKEN_CHARS = 16
PROTECTED_PREFIX = "/v1/"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def auth_required(auth, host: str | None) -> bool:
    """`synth.auth.required`, or by default: required unless the service binds to loopback only
    (`host` None: the bind address is the cluster's choice, as in a RayService, so required)."""
    if auth.required is not None:
        return auth.required
    return host is None or not is_loopback(host)


MAX_TOKEN_FILE_BYTES = 4096  # a secret, not a document: a link to /dev/zero must not read forever


def _token_file_text(path: Path) -> str:
    """The token file's text; ConfigError saying what is wrong with the file (and naming it)."""
    return read_small_text(path, f"synth.auth.token_file: {path}", MAX_TOKEN_FILE_BYTES, bounded="a token file")


def read_token(auth, required: bool) -> str | None:
    """The token from `synth.auth.token_file`, else `$<synth.auth.token_env>`; ConfigError when
    `required` and there is none, or when the one given is too short to be a secret."""
    if auth.token_file:
        path = Path(auth.token_file).expanduser()
        token, source = _token_file_text(path).strip(), f"synth.auth.token_file ({path})"
    else:
        token, source = os.environ.get(auth.token_env, "").strip(), f"${auth.token_env} (synth.auth.token_env)"
    if not token:
        if required:
            raise ConfigError(
                f"the API needs a bearer token when it binds beyond loopback: set {source} to a secret of at "
                f"least {MIN_TOKEN_CHARS} characters, or name a file holding one in synth.auth.token_file"
            )
        return None
    if len(token) < MIN_TOKEN_CHARS:
        raise ConfigError(f"{source}: the token has {len(token)} characters; use at least {MIN_TOKEN_CHARS}")
    return token


@dataclass(frozen=True)
class Guard:
    token: str | None  # None: no authentication (loopback without a token set)
    max_body_bytes: int
    max_header_bytes: int = 32_768
    max_open_requests: int | None = None  # `/v1/...` requests held at once; None: no bound here
    body_timeout_s: float | None = None
    retry_after_s: int = 2

    def is_work(self, scope) -> bool:
        """A `/v1/...` request: authenticated and counted (health, readiness and the docs are neither)."""
        path = scope["path"]
        root = scope.get("root_path", "")
        if root and path.startswith(root):  # Serve may mount the app under a route prefix
            path = path[len(root):]
        return path.startswith(PROTECTED_PREFIX)

    def protects(self, scope) -> bool:
        return self.token is not None and self.is_work(scope)

    def authorised(self, header: str | None) -> bool:
        scheme, _, given = (header or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self.token.encode())


class BodyTooLarge(HTTPException):
    """Raised from `receive` while a chunked body streams past the cap; FastAPI re-raises HTTP
    errors from body reading as they are, so the client gets this 413 and not a 400."""

    def __init__(self, limit: int):
        super().__init__(413, [{"loc": ["body"], "msg": f"request body exceeds {limit} bytes "
                                "(synth.limits.max_body_bytes)"}])


def _refusal(status: int, field: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"detail": [{"loc": [field], "msg": message}]}, status_code=status, headers=headers)


class BodyTimeout(HTTPException):
    """Raised from `receive` when the body has not arrived within `body_timeout_s`: a client that
    trickles its body would otherwise hold one of the ingress' open requests for as long as it likes."""

    def __init__(self, seconds: float):
        super().__init__(408, [{"loc": ["body"], "msg": f"request body not received within {seconds:g} s "
                                "(synth.limits.body_timeout_s)"}], headers={"Connection": "close"})


class RequestGuard:
    def __init__(self, app, guard: Callable[[], Guard]):
        self.app = app
        self.guard = guard
        self.open_requests = 0  # `/v1/...` requests of this replica between their headers and their answer

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        guard = self.guard()
        refusal = self._refusal(guard, scope)
        if refusal is not None:
            return await refusal(scope, receive, send)
        work = guard.is_work(scope)
        self.open_requests += work
        try:
            await self.app(scope, _guarded_receive(guard, receive), send)
        finally:
            self.open_requests -= work

    def _refusal(self, guard: Guard, scope) -> JSONResponse | None:
        """The answer to a request refused on its headers alone, else None."""
        header_bytes = sum(len(name) + len(value) for name, value in scope["headers"])
        if header_bytes > guard.max_header_bytes:
            return _refusal(431, "headers", f"request headers of {header_bytes} bytes exceed the limit of "
                            f"{guard.max_header_bytes} (synth.limits.max_header_bytes)", {"Connection": "close"})
        headers = Headers(scope=scope)
        if guard.protects(scope) and not guard.authorised(headers.get("authorization")):
            return _refusal(401, "authorization", "expected the header `Authorization: Bearer <token>` with the "
                            "service's token", {"WWW-Authenticate": "Bearer"})
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > guard.max_body_bytes):
            return _refusal(413, "body", f"request body of {declared} bytes exceeds the limit of "
                            f"{guard.max_body_bytes} (synth.limits.max_body_bytes)", {"Connection": "close"})
        limit = guard.max_open_requests
        if limit is not None and guard.is_work(scope) and self.open_requests >= limit:
            return _refusal(429, "request", f"{self.open_requests} requests are open (synth.limits.max_open_requests "
                            f"is {limit}); retry later", {"Retry-After": str(guard.retry_after_s)})
        return None


def _guarded_receive(guard: Guard, receive):
    """`receive` with the body cap and, until the body is complete, the body deadline."""
    received, complete = 0, False
    loop = asyncio.get_running_loop()
    deadline = None if guard.body_timeout_s is None else loop.time() + guard.body_timeout_s

    async def guarded():
        nonlocal received, complete
        if complete or deadline is None:  # after the body: e.g. waiting for a disconnect, unbounded
            message = await receive()
        else:
            try:
                message = await asyncio.wait_for(receive(), timeout=max(deadline - loop.time(), 0.0))
            except asyncio.TimeoutError:
                raise BodyTimeout(guard.body_timeout_s) from None
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            complete = not message.get("more_body", False)
            if received > guard.max_body_bytes:
                raise BodyTooLarge(guard.max_body_bytes)
        return message

    return guarded
