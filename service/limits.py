"""Limits that protect the server from large or slow clients.

`BodyGuard` (ASGI middleware) enforces the body limit of every route while the body streams in: a
declared Content-Length over the limit is answered 413 before a byte is read, a chunked body is counted
as it arrives and cut off at the limit with 413, and a body that has not fully arrived within
`body_timeout` seconds is answered 408. Both close the connection, so the rest of the body is never read.
Slow *headers* never reach the application: put a reverse proxy with header timeouts in front (docs/SERVING.md).

`PixelBudget` bounds the decoded pixels held by all requests being served at once (503 when full).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from contextlib import contextmanager

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import ClientError, error_response, plain_error_response

TF_PREDICT = re.compile(r"^/v1/models/[^/]*:predict$")
CLOSE = {"connection": "close"}


class BodyError(ClientError):
    """The request body broke a limit while it was being read (413 too large, 408 too slow)."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(status, kind, message, headers=CLOSE)


class BodyGuard:
    """Pure ASGI middleware: the body limit (`Settings.body_limit`) and the body deadline on every HTTP request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Refuse a declared length over the limit at once; otherwise read the body through the guard."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope["app"].state.service
        settings = state.settings
        limit = settings.body_limit(scope["path"])
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _refuse(scope, send, state, BodyError(
                413, "request_too_large", f"the request has {declared} bytes, more than the limit of {limit}"))
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settings.body_timeout
        received = 0
        finished = False
        cut = False

        async def guarded_receive() -> Message:
            nonlocal received, finished, cut
            if finished:  # the body is complete: waiting for a disconnect has no deadline
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                cut = True
                raise BodyError(408, "request_timeout", f"the request body did not arrive within "
                                                        f"{settings.body_timeout:g} s; send it faster, or "
                                                        f"raise --body-timeout") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    cut = True
                    raise BodyError(413, "request_too_large", f"the request body is larger than the limit of "
                                                              f"{limit} bytes")
                finished = not message.get("more_body", False)
            else:
                finished = True
            return message

        started = False

        async def send_closing_when_cut(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            if cut and message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        try:
            await self.app(scope, guarded_receive, send_closing_when_cut)
        except BodyError as err:  # escaped every handler: answer it here unless an answer has begun
            if started:
                raise
            await _refuse(scope, send, state, err)


def _content_length(scope: Scope) -> int | None:
    """The declared Content-Length (None when absent or unreadable; the server refuses malformed ones)."""
    for name, value in scope.get("headers", []):
        if name.lower() == b"content-length":
            text = value.decode("latin-1").strip()
            return int(text) if text.isdigit() else None
    return None


async def _refuse(scope: Scope, send: Send, state: object, err: ClientError) -> None:
    """Answer `err` in the shape of the route asked for, and close the connection."""
    answer = plain_error_response if TF_PREDICT.match(scope["path"]) else error_response
    response = answer(state.metrics, err.status, err.kind, err.message, err.headers)

    async def no_body() -> Message:
        return {"type": "http.disconnect"}

    await response(scope, no_body, send)


class PixelBudget:
    """Decoded pixels held by the requests being served, against `limit` (used on the event loop only)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    @contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        """Reserve `pixels` for the block; ClientError 503 'busy' (with Retry-After) when they do not fit now."""
        if self.used + pixels > self.limit:
            raise ClientError(503, "busy", f"the server is decoding other images ({self.used} of {self.limit} "
                                           f"pixels in use; this request needs {pixels}); retry shortly",
                              headers={"retry-after": "1"})
        self.used += pixels
        try:
            yield
        finally:
            self.used -= pixels


def check_request_pixels(pixels: int, limit: int) -> None:
    """ClientError 413 'too_many_pixels_in_request' when one request's images decode to more than `limit` pixels."""
    if pixels > limit:
        raise ClientError(413, "too_many_pixels_in_request", f"the images of this request decode to {pixels} pixels "
                                                             f"together, more than the limit of {limit} per request; "
                                                             f"send fewer or smaller images")
