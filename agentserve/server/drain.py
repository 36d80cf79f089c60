"""Stop admitting work while SGLang drains (runs in SGLang's HTTP process).

On SIGTERM SGLang's tokenizer manager sets `gracefully_exit`, turns /health to 503 and waits
for the requests it holds to finish, but it still accepts new ones, so a busy server would
never drain. This ASGI guard, outside the agent middleware, answers new generation requests
and session opens with 503 and Retry-After from that moment; requests already running finish.
"""

from __future__ import annotations

import json
from typing import Any, Awaitable, Callable

RETRY_AFTER_S = 10  # long enough for a restart or for a balancer to route elsewhere
REFUSED_POSTS = ("/v1/", "/generate", "/agentserve/v1/sessions")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def shutting_down() -> bool:
    from sglang.srt.entrypoints import http_server

    state = getattr(http_server, "_global_state", None)
    tm = getattr(state, "tokenizer_manager", None)
    return bool(tm is not None and tm.gracefully_exit)


class DrainGuard:
    def __init__(self, app: Callable[..., Awaitable[None]], is_draining: Callable[[], bool] = shutting_down):
        self.app = app
        self.is_draining = is_draining

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope.get("type") == "http" and scope.get("method") == "POST"
                and scope.get("path", "").startswith(REFUSED_POSTS) and self.is_draining()):
            body = json.dumps({"object": "error", "type": "ServiceUnavailableError", "code": 503, "param": "server",
                               "message": "server: shutting down (draining the requests in flight); retry "
                                          f"after {RETRY_AFTER_S} s or on another replica"}).encode()
            await send({"type": "http.response.start", "status": 503,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                    (b"retry-after", str(RETRY_AFTER_S).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


def install(app: Any) -> None:
    """Add the guard to SGLang's FastAPI app (once); added last, it runs first."""
    if not getattr(app.state, "agentserve_drain", False):
        app.add_middleware(DrainGuard)
        app.state.agentserve_drain = True
