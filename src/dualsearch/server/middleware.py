"""Pure-ASGI layers in front of the app's routes.

- :class:`BodyLimit`: request bodies are capped as they arrive (a declared ``Content-Length`` over
  the cap is refused before one byte is read; a chunked body is cut off once past it), so nothing
  past the cap is ever parsed or spooled to disk.
- :class:`HeadAsGet`: ``HEAD`` on any route answers what ``GET`` would, headers only.
- :class:`InternalErrors`: an unexpected exception becomes a JSON 500 ``{"detail": "internal
  error"}`` with its traceback logged, never Starlette's plain-text page.
"""
from __future__ import annotations

import logging

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import DualsearchError

log = logging.getLogger(__name__)

# multipart framing around the one uploaded file (boundaries, part headers): the route itself checks
# the file's own size against the limit; the body may exceed it by this much before it is cut off.
MULTIPART_SLACK = 16 * 1024


class BodyTooLarge(DualsearchError):
    """Raised from ``receive`` once a streamed request body is past the limit."""


def declared_length(scope: Scope) -> int | None:
    """The request's ``Content-Length`` as an int; None when absent or not a number."""
    for key, value in scope.get("headers", ()):
        if key.lower() == b"content-length":
            text = value.decode("latin-1").strip()
            return int(text) if text.isascii() and text.isdigit() else None
    return None


class BodyLimit:
    """Request bodies over ``max_bytes`` (+ multipart slack) get a JSON 413 "upload larger than N
    bytes", enforced while the body streams in."""

    def __init__(self, app: ASGIApp, max_bytes: int, slack: int = MULTIPART_SLACK):
        self.app = app
        self.max_bytes = max_bytes
        self.limit = max_bytes + slack

    async def reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Send the 413 (the connection is closed: the rest of the body is never read)."""
        response = JSONResponse({"detail": f"upload larger than {self.max_bytes} bytes"}, status_code=413,
                                headers={"Connection": "close"})
        await response(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = declared_length(scope)
        if declared is not None and declared > self.limit:
            await self.reject(scope, receive, send)
            return
        received = 0
        over = started = False

        async def limited_receive() -> Message:
            nonlocal received, over
            if over:
                raise BodyTooLarge(f"request body over {self.limit} bytes")
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    over = True
                    raise BodyTooLarge(f"request body over {self.limit} bytes")
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if over and not started:  # whatever the app made of the cut-off body: the 413 replaces it
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not over or started:
                raise
        if over and not started:
            await self.reject(scope, receive, send)


class HeadAsGet:
    """``HEAD`` is served as ``GET`` with the body dropped: same status and headers (Content-Length
    included), no body."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return
        done = False

        async def headers_only(message: Message) -> None:
            nonlocal done
            if message["type"] == "http.response.start":
                await send(message)
            elif message["type"] in ("http.response.body", "http.response.pathsend") and not done:
                if not message.get("more_body", False):
                    done = True
                    await send({"type": "http.response.body", "body": b"", "more_body": False})

        await self.app(dict(scope, method="GET"), receive, headers_only)


class InternalErrors:
    """Any exception escaping the routes: traceback logged, JSON 500 ``{"detail": "internal error"}``
    sent (when no response has started; otherwise the connection is dropped)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            log.exception("internal error answering %s %s", scope.get("method"), scope.get("path"))
            if started:
                raise
            await JSONResponse({"detail": "internal error"}, status_code=500)(scope, receive, send)
