"""The one benchmark client: a streaming `/generate` request, timed where the user sees it.

Every bench (serve, replay, tiers) sends its requests through `send`, which streams the answer
(server-sent events) and records, on this process's clock, when the request was sent, when
its first token arrived and when its last did, the tokens generated, and what the server says
about speculation (τ inputs, copy share when it reports one). Threads give concurrency:
`requests` releases the GIL while it waits on the socket.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import requests

REFUSED = (429, 503)  # the tier gate's answers: counted, never retried here


@dataclass
class RequestRecord:
    """One request as the client saw it. Times are `time.perf_counter()` seconds."""

    t_send: float
    t_first: float | None  # the first chunk that carried a token (None: refused or no token)
    t_end: float
    tokens: int  # completion tokens
    status: int = 200
    prompt_tokens: int = 0
    cached_tokens: int = 0
    accept_length: float | None = None  # SGLang's spec_accept_length (tokens per verify step)
    verify_ct: int | None = None  # verify steps (None without speculation)
    copy_share: float | None = None  # share of accepted drafts that were copied, where the server reports it
    reason: str | None = None  # why the server refused it
    output_ids: list[int] | None = None  # the answer's token ids (greedy identity checks)
    stop_token: int | None = None  # the stop token that ended it, when one did (not among output_ids)
    rid: str | None = None
    labels: dict[str, Any] = field(default_factory=dict)  # system, domain, concurrency, tier, ...
    extra: dict[str, Any] = field(default_factory=dict)  # a bench's own annotations (prefill stalls, ...)

    @property
    def ok(self) -> bool:
        return self.status == 200

    def to_json(self) -> dict[str, Any]:
        from agentserve.bench import metrics

        d = asdict(self)
        labels, extra = d.pop("labels"), d.pop("extra")
        return {**labels, **d, **extra, "e2e_s": metrics.e2e_s(self), "ttft_s": metrics.ttft_s(self),
                "user_tps": metrics.decode_tps(self)}


def send(url: str, ids: list[int], max_new: int, temperature: float = 0.0, headers: dict[str, str] | None = None,
         rid: str | None = None, labels: dict[str, Any] | None = None, timeout: float = 1800.0) -> RequestRecord:
    """POST /generate with stream=True and time it. A refusal (429/503) comes back as a record
    with its status and the server's reason; any other HTTP error raises."""
    body: dict[str, Any] = {"input_ids": ids, "stream": True,
                            "sampling_params": {"temperature": temperature, "max_new_tokens": max_new}}
    if rid:
        body["rid"] = rid
    t_send = time.perf_counter()
    t_first: float | None = None
    meta: dict[str, Any] = {}
    out_ids: list[int] = []
    with requests.post(url + "/generate", json=body, headers=headers or {}, stream=True, timeout=timeout) as r:
        if r.status_code in REFUSED:
            return RequestRecord(t_send, None, time.perf_counter(), 0, status=r.status_code, reason=_reason(r), rid=rid,
                                 labels=dict(labels or {}))
        r.raise_for_status()
        for line in r.iter_lines(chunk_size=None):
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                break
            chunk = json.loads(payload)
            if "error" in chunk:  # SGLang reports a failure inside the stream
                raise RuntimeError(f"/generate failed mid-stream: {chunk['error']}")
            meta = chunk.get("meta_info") or meta
            ids_now = chunk.get("output_ids")
            if isinstance(ids_now, list):  # cumulative (SGLang's default) or, incremental, a delta
                n = int(meta.get("completion_tokens") or 0)
                out_ids = list(ids_now) if len(ids_now) == n else out_ids + list(ids_now)
            if t_first is None and int(meta.get("completion_tokens") or 0) >= 1:
                t_first = time.perf_counter()
    t_end = time.perf_counter()
    return RequestRecord(t_send, t_first, t_end, int(meta.get("completion_tokens") or 0),
                         prompt_tokens=int(meta.get("prompt_tokens") or 0), cached_tokens=int(meta.get("cached_tokens") or 0),
                         accept_length=_num(meta.get("spec_accept_length")), verify_ct=_int(meta.get("spec_verify_ct")),
                         copy_share=_num(meta.get("copy_share")), rid=rid, labels=dict(labels or {}),
                         output_ids=out_ids, stop_token=_stop_token(meta))


def _stop_token(meta: dict[str, Any]) -> int | None:
    fin = meta.get("finish_reason") or {}
    m = fin.get("matched") if isinstance(fin, dict) and fin.get("type") == "stop" else None
    return m if isinstance(m, int) and not isinstance(m, bool) else None


def _reason(r: requests.Response) -> str:
    try:  # the gate's error names the tier and why it held the request
        return str(r.json()["message"])
    except (ValueError, KeyError, TypeError):
        return r.text[:300]


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _int(x: Any) -> int | None:
    return int(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def open_session(url: str, agent: str) -> dict[str, str]:
    """An agentserve session for one agent; returns the headers its turns carry."""
    r = requests.post(url + "/agentserve/v1/sessions", json={"agent_id": agent}, timeout=60)
    r.raise_for_status()
    return {"x-agent-id": agent, "x-session-id": r.json()["id"]}


def close_session(url: str, headers: dict[str, str]) -> None:
    requests.delete(url + f"/agentserve/v1/sessions/{headers['x-session-id']}", headers={"x-agent-id": headers["x-agent-id"]},
                    timeout=60)


def warm_up(url: str, prompts: list[list[int]], seconds: float, concurrency: int, max_new: int,
            headers: dict[str, str] | None = None) -> int:
    """Closed-loop traffic for `seconds` (clients start no request after it) on prompts no
    measured phase uses, so a warm server is measured; returns the requests sent."""
    import concurrent.futures as cf

    if seconds <= 0 or not prompts:
        return 0
    t0 = time.perf_counter()

    def client(k: int) -> int:
        n = 0
        while time.perf_counter() - t0 < seconds:
            send(url, prompts[(k + n * concurrency) % len(prompts)], max_new, headers=headers)
            n += 1
        return n

    with cf.ThreadPoolExecutor(concurrency) as ex:
        return sum(ex.map(client, range(concurrency)))
