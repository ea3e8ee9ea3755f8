"""Plain ASGI middleware (no BaseHTTPMiddleware: it would break streaming and disconnect signals).

- ``APIKeyMiddleware``: ``Authorization: Bearer KEY`` on every path but /health, compared with
  ``hmac.compare_digest`` (constant time); 401 in OpenAI's shape otherwise.
- ``BodyLimitMiddleware``: a body larger than ``max_body_bytes`` gets 413 before the app parses it
  (by Content-Length when given, else by counting chunked bytes while buffering). After the body,
  ``receive`` passes through, so the app still sees ``http.disconnect``.
"""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from modelhive.server.errors import error_response

OPEN_PATHS = frozenset({"/health"})


class APIKeyMiddleware:
    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        given = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                given = value
                break
        if hmac.compare_digest(given, self.expected):
            await self.app(scope, receive, send)
            return
        message = ("Missing API key: send it as 'Authorization: Bearer KEY'" if not given
                   else "Incorrect API key provided")
        response = error_response(401, message, code="invalid_api_key",
                                  headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int):
        self.app = app
        self.max_body_bytes = max_body_bytes

    def _too_large(self) -> object:
        return error_response(413, f"The request body is larger than the server's limit of "
                              f"{self.max_body_bytes} bytes; send a smaller request",
                              code="request_too_large")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > self.max_body_bytes:
                    await self._too_large()(scope, receive, send)  # type: ignore[operator]
                    return
        # buffer the body (the app reads it whole anyway), counting as it comes
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # disconnected before the body arrived
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_body_bytes:
                await self._too_large()(scope, receive, send)  # type: ignore[operator]
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
