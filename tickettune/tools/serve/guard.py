"""The HTTP guard in front of every route: API keys and the body limit.

`TICKETTUNE_API_KEY` guards every route but the open ones (`/healthz` and the page, which holds no data and
asks for the key itself); `TICKETTUNE_ADMIN_KEY` guards `/v1/admin/` (off, 404, without it). Keys are compared
in constant time and never logged.
"""

from __future__ import annotations

import hmac
import json
from typing import Any, Callable

from tickettune.tools.serve.schemas import ApiError, bad, error_body

API_KEY_ENV = "TICKETTUNE_API_KEY"
ADMIN_KEY_ENV = "TICKETTUNE_ADMIN_KEY"
ADMIN_PREFIX = "/v1/admin/"
OPEN_PATHS = frozenset({"/healthz", "/", "/page.js"})
DRAIN_FACTOR = 16               # an over-limit body is read and dropped up to 16x the limit, so that the
                                # client, still sending, can read the 413 (closing on unread data resets it)


class Guard:
    """ASGI middleware in front of every route: the API key (constant-time comparison; never logged)
    and the body limit (413; a longer body is read and dropped up to DRAIN_FACTOR x the limit, so that
    the client can read the answer). The app behind it gets the body already read."""

    def __init__(self, app: Any, api_key: str | None, max_body: int, admin_key: str | None = None) -> None:
        self.app, self.max_body = app, max_body
        self._key = api_key.encode() if api_key else None
        self._admin_key = admin_key.encode() if admin_key else None

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])  # names are lower-case bytes
        refusal, path = None, scope["path"]
        if path.startswith(ADMIN_PREFIX):  # its own key, and off without one
            if self._admin_key is None:
                refusal = ApiError(404, f"admin routes are off: start the server with {ADMIN_KEY_ENV} set")
            elif not self._authorized(headers, self._admin_key):
                refusal = ApiError(401, f"missing or wrong admin key: send \"Authorization: Bearer <{ADMIN_KEY_ENV}>\"",
                                   headers={"WWW-Authenticate": "Bearer"})
        elif self._key is not None and path not in OPEN_PATHS and not self._authorized(headers, self._key):
            refusal = ApiError(401, f"missing or wrong API key: send \"Authorization: Bearer <{API_KEY_ENV}>\"",
                               headers={"WWW-Authenticate": "Bearer"})
        declared = headers.get(b"content-length", b"0")
        if refusal is None and (not declared.isdigit() or int(declared) > self.max_body):
            refusal = ApiError(413, f"body larger than {self.max_body} bytes") if declared.isdigit() \
                else bad("content-length", "not a number")
        if refusal is not None and declared.isdigit() and int(declared) > self.max_body * DRAIN_FACTOR:
            return await self._answer(send, refusal)  # too big even to drain: answer and let it close
        body, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if refusal is None and size > self.max_body:
                refusal = ApiError(413, f"body larger than {self.max_body} bytes")
            if refusal is None:
                body.append(chunk)
            if not message.get("more_body", False) or size > self.max_body * DRAIN_FACTOR:
                break
        if refusal is not None:
            return await self._answer(send, refusal)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(body), "more_body": False}
            return await receive()  # http.disconnect, when the client goes

        await self.app(scope, replay, send)

    @staticmethod
    def _authorized(headers: dict[bytes, bytes], key: bytes) -> bool:
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), key)

    @staticmethod
    async def _answer(send: Callable, exc: ApiError) -> None:
        payload = json.dumps(error_body(exc.status, exc.message, exc.param)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        headers += [(k.lower().encode(), v.encode()) for k, v in exc.headers.items()]
        await send({"type": "http.response.start", "status": exc.status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})
