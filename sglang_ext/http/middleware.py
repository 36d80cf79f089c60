"""Agent identity, tier admission and per-agent timing on SGLang's HTTP server.

An ASGI middleware (added by the plugin in the HTTP process) sees every request, and for each
generation request (`/v1/chat/completions`, `/v1/completions`, `/generate`) runs, in order:
1. authorize — the API key says who calls and what they may reach (auth.py);
2. identify  — agent id and tier (identity.py); session `x-session-id` (sessions.py);
3. tag       — agent label, tier and session go to the scheduler in SGLang's own
               `custom_params` transport (keys `__agentserve_*`), where the speculative worker
               uses them (tier weights, per-session draft index, per-agent acceptance metrics);
4. admit     — the tier gate starts, queues or refuses the request (tiers/admission.py);
5. time      — TTFT (from arrival, admission wait included), per-user tok/s (metrics.py),
               which also tell the gate whether the tier's promise held.
Bad values answer 4xx naming the header or field; SGLang never sees those requests.
agentserve's own endpoints are FastAPI routes (routes.py).
"""

from __future__ import annotations

import copy
import json
import re
import logging
import time
from typing import Any, Callable, Optional

from sglang_ext.http.auth import GENERATION_PATHS, INTERNAL_KEY, authorize
from sglang_ext.http.errors import HttpError, Receive, Scope, Send, error_body, read_body, reply, reply_error
from sglang_ext.http.identity import Caller, identify
from sglang_ext.http.metrics import Measured, ResponseWatch
from sglang_ext.http.registry import AgentRegistry, registry
from sglang_ext.http.routes import PRINCIPAL, REGISTRY, router
from sglang_ext.tiers.admission import Overloaded

log = logging.getLogger(__name__)
MAX_BODY = 64 << 20  # bytes of one request body read into memory
CUSTOM_KEYS = ("__agentserve_agent", "__agentserve_tier", "__agentserve_session", "__agentserve_ended")


def parse_body(raw: bytes) -> dict[str, Any]:
    """The request's JSON object; anything else is a 400 naming the body (SGLang's own request
    models fail on some non-objects, e.g. `null`, with a 500)."""
    try:
        doc = json.loads(raw) if raw.strip() else {}
    except ValueError as e:
        raise HttpError(400, "body", f"body: invalid JSON ({type(e).__name__})") from None
    except RecursionError:
        raise HttpError(400, "body", "body: JSON nested too deeply") from None
    if not isinstance(doc, dict):
        raise HttpError(400, "body", f"body: expected a JSON object, got {type(doc).__name__}")
    return doc


def openai_model(path: str) -> Optional[type]:
    """SGLang's own pydantic request model for an OpenAI route (None for /generate)."""
    from sglang.srt.entrypoints.openai import protocol

    return {"/v1/chat/completions": protocol.ChatCompletionRequest,
            "/v1/completions": protocol.CompletionRequest}.get(path)


def validate_openai(path: str, doc: dict[str, Any]) -> None:
    """Check an OpenAI body against SGLang's request model here, so a bad one gets our 400 naming
    the field: SGLang's own answer to it quotes its traceback and file paths to the client."""
    model = openai_model(path)
    if model is None:
        return
    from pydantic import ValidationError

    try:
        model.model_validate(copy.deepcopy(doc))  # its "before" validators edit what they are given
    except ValidationError as e:
        err = e.errors(include_url=False, include_context=False, include_input=False)[0]
        # the location without pydantic's union/validator labels: messages.0.role
        param = ".".join(str(p) for p in err.get("loc", ()) if re.fullmatch(r"\w+", str(p))) or "body"
        raise HttpError(400, param, f"{param}: {err.get('msg', 'invalid value')}") from None
    except (ValueError, TypeError, AttributeError, KeyError, RecursionError) as e:  # a model validator's own
        raise HttpError(400, "body", f"body: invalid request ({type(e).__name__})") from None


def tag_request(path: str, doc: dict[str, Any], tags: dict[str, str]) -> None:
    """Put our tags into SGLang's custom_params (the scheduler receives them on each Req)."""
    def merge(holder: dict[str, Any]) -> None:
        cp = holder.get("custom_params")
        # a client's own __agentserve_* keys are dropped: only this layer speaks for an agent
        own = {k: v for k, v in cp.items() if not str(k).startswith("__agentserve_")} if isinstance(cp, dict) else {}
        holder["custom_params"] = {**own, **tags}

    if path == "/generate":
        sp = doc.get("sampling_params")
        if sp is None:
            doc["sampling_params"] = sp = {}
        for holder in (sp if isinstance(sp, list) else [sp]):
            if isinstance(holder, dict):
                merge(holder)
    else:
        merge(doc)


def ask_streamed_usage(path: str, doc: dict[str, Any]) -> None:
    """A streamed OpenAI answer's chunks carry the running usage (`continuous_usage_stats`), so
    per-agent tok/s counts tokens: a speculative step sends several tokens in one chunk, and a
    chunk count would undercount exactly the fast answers. Clients see a `usage` field on each
    chunk (OpenAI's schema has it); what they asked of `include_usage` is kept."""
    if path == "/generate" or doc.get("stream") is not True:
        return
    so = doc.get("stream_options")
    if so is None:
        doc["stream_options"] = {"continuous_usage_stats": True}
    elif isinstance(so, dict) and "continuous_usage_stats" not in so:
        so["continuous_usage_stats"] = True


def with_body(scope: Scope, raw: bytes) -> Scope:
    scope = dict(scope)
    scope["headers"] = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-length"] + [
        (b"content-length", str(len(raw)).encode())]
    return scope


def header_map(scope: Scope) -> dict[str, str]:
    # ASGI header bytes are latin-1; a client's odd bytes must not become a 500
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


class AgentMiddleware:
    def __init__(self, app: Callable[..., Any], registry: Optional[AgentRegistry] = None) -> None:
        self.app = app
        self._registry = registry

    @property
    def registry(self) -> AgentRegistry:
        return self._registry if self._registry is not None else registry()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http":
            return await self.app(scope, receive, send)
        path, method = scope.get("path", ""), scope.get("method")
        headers = header_map(scope)
        try:
            who = authorize(self.registry.keys, path, method, headers)
        except HttpError as e:
            return await reply_error(send, e)
        if path not in GENERATION_PATHS or method != "POST":
            return await self.app({**scope, PRINCIPAL: who, REGISTRY: self.registry}, receive, send)
        reg = self.registry
        try:
            raw = await read_body(receive, MAX_BODY)
            doc = parse_body(raw)
            validate_openai(path, doc)
            caller = identify(reg.prof, who, headers, doc)
            sid = headers.get("x-session-id")
            if sid is not None:
                reg.sessions.use(sid, caller.agent)
        except HttpError as e:
            return await reply_error(send, e)
        tier = caller.tier
        label = reg.table.label(caller.agent)
        tags = {"__agentserve_agent": label, "__agentserve_tier": tier.name if tier else "", "__agentserve_session": sid or ""}
        ended = reg.sessions.take_ended()
        if ended:  # the scheduler hears of closed sessions only through requests (the one channel)
            tags["__agentserve_ended"] = ",".join(ended)
        tag_request(path, doc, tags)
        ask_streamed_usage(path, doc)
        raw = json.dumps(doc).encode()
        scope = with_body(scope, raw)
        await self._admitted(scope, raw, receive, send, caller, label, ended)

    async def _admitted(self, scope: Scope, raw: bytes, receive: Receive, send: Send, caller: Caller, label: str,
                        ended: list[str]) -> None:
        """Admit through the tier gate, forward to SGLang, time the answer, release."""
        reg, tier = self.registry, caller.tier
        arrived = time.monotonic()
        try:
            queued = await reg.gate.admit(tier.name if tier else None)
        except Overloaded as e:
            reg.table.count_admission(tier, "timed_out" if e.timed_out else "rejected")
            reg.sessions.give_back(ended)  # this request never reaches the scheduler
            return await reply(send, e.status, error_body(e.status, "x-agent-tier", e.message),
                               [(b"retry-after", str(e.retry_after).encode())])
        if queued:
            reg.table.count_admission(tier, "queued")
        reg.table.count_admission(tier, "admitted")
        waited = time.monotonic() - arrived if queued else 0.0
        st = reg.table.get(caller.agent, tier.name if tier else None)
        watch = ResponseWatch()
        sent = [False]

        async def replay() -> dict[str, Any]:
            if not sent[0]:
                sent[0] = True
                return {"type": "http.request", "body": raw, "more_body": False}
            return await receive()

        async def watched(msg: dict[str, Any]) -> None:
            watch.see(msg)
            await send(msg)

        reg.table.started(st)
        m: Optional[Measured] = None
        try:
            await self.app(scope, replay, watched)
        finally:
            reg.table.finished(st)
            try:
                m = watch.measure()
                if m is not None:
                    m = Measured(None if m.ttft_s is None else m.ttft_s + waited, m.itl_s, m.tokens_per_s)
                    reg.table.record(st, label, tier, m)
            except Exception as e:  # bookkeeping must never leak an admission slot
                log.warning("agent metrics for a request failed: %s", e)
            await reg.gate.release(tier.name if tier else None, m.tokens_per_s if m else None,
                                   m.ttft_s if m else None, waited)




def warmup_with_internal_key(warmup: Callable[..., Any]) -> Callable[..., Any]:
    """SGLang's warmup requests go to this server before it reports ready: they carry the
    process's internal key (through SGLang's own api_key setting, for their duration only)."""
    def run(*args: Any, **kwargs: Any) -> Any:
        from sglang.srt.runtime_context import get_serving

        with get_serving().override(api_key=INTERNAL_KEY):
            return warmup(*args, **kwargs)

    return run


def install(app: Any, args: tuple = (), kwargs: Optional[dict[str, Any]] = None) -> Optional[tuple[tuple, dict]]:
    """Add the middleware and routes to SGLang's FastAPI app (once), and build the registry now
    (a profile whose keys cannot be read stops the server here). With launch_server's (args,
    kwargs), returns them with the warmup wrapped (warmup_with_internal_key)."""
    if not getattr(app.state, "agentserve_agents", False):
        registry()
        app.include_router(router)
        app.add_middleware(AgentMiddleware)
        app.state.agentserve_agents = True
    if kwargs is None:
        return None
    kwargs = dict(kwargs)
    if len(args) > 4:
        args = (*args[:4], warmup_with_internal_key(args[4]), *args[5:])
    else:
        from sglang.srt.entrypoints import http_server

        kwargs["execute_warmup_func"] = warmup_with_internal_key(
            kwargs.get("execute_warmup_func", http_server._execute_server_warmup))
    return args, kwargs
