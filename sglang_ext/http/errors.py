"""Error answers of the agent API: one JSON shape (OpenAI's error fields plus `param`, the field
or header at fault) and the raw-ASGI helpers the middleware answers with."""

from __future__ import annotations

import json
from typing import Any, Awaitable, Callable, Optional

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

KINDS = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError", 404: "NotFoundError",
         405: "MethodNotAllowedError", 413: "RequestTooLargeError", 429: "RateLimitError",
         503: "ServiceUnavailableError"}


class HttpError(Exception):
    """A request answered with `status` before SGLang sees it; `message` starts with `param`.
    Messages never carry server paths or tracebacks."""

    def __init__(self, status: int, param: str, message: str, retry_after: Optional[int] = None) -> None:
        super().__init__(message)
        self.status, self.param, self.message, self.retry_after = status, param, message, retry_after

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.param, self.message)

    def headers(self) -> list[tuple[bytes, bytes]]:
        out = [(b"retry-after", str(self.retry_after).encode())] if self.retry_after else []
        if self.status == 401:
            out.append((b"www-authenticate", b"Bearer"))
        return out


def error_body(status: int, param: str, message: str) -> dict[str, Any]:
    return {"object": "error", "type": KINDS.get(status, "Error"), "code": status, "param": param, "message": message}


async def reply(send: Send, status: int, payload: dict[str, Any], headers: Optional[list[tuple[bytes, bytes]]] = None
                ) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
                + (headers or [])})
    await send({"type": "http.response.body", "body": body})


async def reply_error(send: Send, e: HttpError) -> None:
    await reply(send, e.status, e.body(), e.headers())


async def read_body(receive: Receive, limit: int) -> bytes:
    parts: list[bytes] = []
    size = 0
    while True:
        msg = await receive()
        if msg["type"] != "http.request":
            break
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise HttpError(413, "body", f"body: larger than {limit} bytes")
        parts.append(chunk)
        if not msg.get("more_body"):
            break
    return b"".join(parts)
