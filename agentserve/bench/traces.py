"""Synthetic multi-turn agent traces (deterministic per seed) for copy-drafting benchmarks.

Kinds (what repeats):
  tool_json  - tool calls with JSON arguments re-issued with small changes; JSON results whose
               fields the assistant restates.
  file_edit  - a file is read, then re-emitted with a few edits (code block), tests run, a
               second fix re-emits the file again; targeted edits pass old/new snippets.
  retry      - calls fail with errors quoting the arguments; the assistant retries nearly the
               same call (shell commands, API calls).
  plan       - a numbered plan re-emitted after each step with updated check boxes.
  echo       - logs/search results quoted back verbatim in the answer.

``AgentTrace.messages`` is OpenAI chat format (assistant ``tool_calls`` with JSON-string
arguments) so server benchmarks can replay it; ``render_segments`` renders it like
``agentserve/templates/chatml_tools.jinja`` and marks which text the assistant generates;
``tokenize_trace`` turns that into a token stream with a generated-token mask.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any, Sequence

TRACE_KINDS = ("tool_json", "file_edit", "retry", "plan", "echo")

_CITIES = ["Paris", "Berlin", "Tokyo", "Lima", "Oslo", "Cairo", "Austin", "Seoul", "Lyon", "Porto"]
_WORDS = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta", "lambda", "zeta",
          "cache", "index", "buffer", "queue", "token", "batch", "shard", "route", "store", "graph"]
_VERBS = ["load", "parse", "merge", "update", "build", "flush", "check", "render", "fetch", "split"]


def _tool(name: str, desc: str, props: dict[str, str]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "description": desc, "parameters": {
        "type": "object", "properties": {k: {"type": v} for k, v in props.items()}, "required": list(props)}}}


def _call(name: str, args: dict[str, Any], i: int) -> dict[str, Any]:
    return {"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


@dataclass
class AgentTrace:
    kind: str
    seed: int
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] = field(default_factory=list)

    def render_segments(self) -> list[tuple[str, bool]]:
        """(text, generated) segments; generated = produced by the assistant (content, tool
        calls and the closing <|im_end|>).  Mirrors chatml_tools.jinja."""
        segs: list[tuple[str, bool]] = []
        msgs = self.messages
        sys_text = msgs[0]["content"] if msgs and msgs[0]["role"] == "system" else \
            "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
        head = "<|im_start|>system\n" + sys_text
        if self.tools:
            head += ("\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n"
                     "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
            for t in self.tools:
                head += "\n" + json.dumps(t["function"])
            head += ("\n</tools>\n\nFor each function call, return a json object with function name and "
                     "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
                     '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')
        segs.append((head + "<|im_end|>\n", False))
        for i, m in enumerate(msgs):
            role = m["role"]
            if role == "system" and i == 0:
                continue
            if role == "tool":
                s = "<|im_start|>user" if i == 0 or msgs[i - 1]["role"] != "tool" else ""
                s += "\n<tool_response>\n" + m["content"] + "\n</tool_response>"
                if i == len(msgs) - 1 or msgs[i + 1]["role"] != "tool":
                    s += "<|im_end|>\n"
                segs.append((s, False))
            elif role == "assistant":
                segs.append(("<|im_start|>assistant\n", False))
                body = m.get("content") or ""
                for j, c in enumerate(m.get("tool_calls") or []):
                    fn = c["function"]
                    if body or j:
                        body += "\n"
                    body += '<tool_call>\n{"name": "' + fn["name"] + '", "arguments": ' + fn["arguments"] + "}\n</tool_call>"
                segs.append((body + "<|im_end|>", True))
                segs.append(("\n", False))
            else:
                segs.append(("<|im_start|>" + role + "\n" + m["content"] + "<|im_end|>\n", False))
        return segs


@dataclass
class TokenTrace:
    kind: str
    tokens: list[int]
    generated: list[bool]  # per token: emitted by the assistant
    spans: list[tuple[int, int]]  # [start, end) of each assistant generation


def tokenize_trace(trace: AgentTrace, tokenizer: Any) -> TokenTrace:
    """Segment-wise tokenisation: prompts as the server would tokenise them, generations as
    the model would emit them (a turn boundary never merges tokens across segments)."""
    toks: list[int] = []
    gen: list[bool] = []
    spans: list[tuple[int, int]] = []
    for text, is_gen in trace.render_segments():
        ids = tokenizer.encode(text, add_special_tokens=False)
        if is_gen:
            spans.append((len(toks), len(toks) + len(ids)))
        toks += ids
        gen += [is_gen] * len(ids)
    return TokenTrace(trace.kind, toks, gen, spans)


# ----------------------------------------------------------------------------- content
def _code_file(rng: random.Random, n_funcs: int) -> list[str]:
    lines = ['"""Module ' + rng.choice(_WORDS) + ' utilities."""', "", "import json", "import os", ""]
    for _ in range(n_funcs):
        verb, noun = rng.choice(_VERBS), rng.choice(_WORDS)
        arg = rng.choice(["path", "items", "config", "data", "records"])
        lines += [f"def {verb}_{noun}({arg}, limit={rng.randint(2, 64)}):",
                  f'    """{verb.capitalize()} the {noun} from {arg}."""',
                  "    result = []",
                  f"    for i, item in enumerate({arg}):",
                  "        if i >= limit:",
                  "            break",
                  f"        result.append(item.get(\"{rng.choice(_WORDS)}\", {rng.randint(0, 9)}))",
                  "    return result", ""]
    return lines


def _edit_code(rng: random.Random, lines: list[str]) -> list[str]:
    out = list(lines)
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(5, len(out))
        if out[i].startswith("def "):
            out[i] = out[i].replace("limit=", "max_items=").replace("):", ", strict=False):")
        elif "result.append" in out[i]:
            out.insert(i, "        if item is None:\n            continue")
        elif out[i].strip():
            out[i] = out[i] + "  # checked"
    return out


def _records(rng: random.Random, n: int) -> list[dict[str, Any]]:
    return [{"id": f"{rng.choice(_WORDS)}-{rng.randint(100, 999)}", "city": rng.choice(_CITIES),
             "price": round(rng.uniform(40, 900), 2), "seats": rng.randint(0, 9),
             "departure": f"2025-0{rng.randint(1, 9)}-{rng.randint(10, 28)}T{rng.randint(10, 23)}:{rng.choice(['00', '15', '30', '45'])}"}
            for _ in range(n)]


def _tool_json(rng: random.Random) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    tools = [_tool("search_flights", "Search flights", {"origin": "string", "destination": "string", "date": "string", "max_price": "number"}),
             _tool("book_flight", "Book a flight", {"flight_id": "string", "passenger": "string", "seat_class": "string"})]
    msgs: list[dict[str, Any]] = [{"role": "system", "content": "You are a travel agent. Use the tools."}]
    origin, dest = rng.sample(_CITIES, 2)
    msgs.append({"role": "user", "content": f"Find me a flight from {origin} to {dest} in May, under 500."})
    for r in range(rng.randint(3, 5)):
        args = {"origin": origin, "destination": dest, "date": f"2025-05-{10 + r}", "max_price": 500 + 50 * r}
        msgs.append({"role": "assistant", "content": "", "tool_calls": [_call("search_flights", args, r)]})
        recs = _records(rng, rng.randint(2, 4))
        msgs.append({"role": "tool", "content": json.dumps({"results": recs}, indent=1)})
        lines = [f"- {x['id']}: departs {x['departure']}, price {x['price']}, {x['seats']} seats left" for x in recs]
        msgs.append({"role": "assistant", "content": "I found these options:\n" + "\n".join(lines)})
        pick = rng.choice(recs)
        msgs.append({"role": "user", "content": rng.choice([f"Book {pick['id']} for Ana Lopez.", "Try the next day instead."])})
        if "Book" in msgs[-1]["content"]:
            b = {"flight_id": pick["id"], "passenger": "Ana Lopez", "seat_class": "economy"}
            msgs.append({"role": "assistant", "content": "", "tool_calls": [_call("book_flight", b, 100 + r)]})
            msgs.append({"role": "tool", "content": json.dumps({"status": "confirmed", **b, "price": pick["price"]})})
            msgs.append({"role": "assistant", "content": f"Booked {pick['id']} for Ana Lopez (economy), price {pick['price']}. "
                         f"It departs {pick['departure']}."})
            msgs.append({"role": "user", "content": "Now search again for the return trip."})
            origin, dest = dest, origin
    return msgs, tools


def _file_edit(rng: random.Random) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    tools = [_tool("read_file", "Read a file", {"path": "string"}),
             _tool("write_file", "Write a file", {"path": "string", "content": "string"}),
             _tool("run_tests", "Run the test suite", {"path": "string"})]
    msgs: list[dict[str, Any]] = [{"role": "system", "content": "You are a coding agent."}]
    for f in range(rng.randint(1, 2)):
        path = f"src/{rng.choice(_WORDS)}_{f}.py"
        code = _code_file(rng, rng.randint(3, 5))
        msgs.append({"role": "user", "content": f"In {path}, make the loops skip None items and rename limit."})
        msgs.append({"role": "assistant", "content": "", "tool_calls": [_call("read_file", {"path": path}, f)]})
        msgs.append({"role": "tool", "content": "\n".join(code)})
        for attempt in range(2):
            code = _edit_code(rng, code)
            msgs.append({"role": "assistant", "content": f"Here is the updated {path}:\n```python\n" + "\n".join(code) + "\n```",
                         "tool_calls": [_call("run_tests", {"path": path}, 10 + attempt)]})
            fn = next(x for x in code if x.startswith("def "))
            msgs.append({"role": "tool", "content": f"FAILED tests/test_{f}.py::test_{attempt} - AssertionError in {fn}\n1 failed, 4 passed"
                         if attempt == 0 else "5 passed in 0.31s"})
        old = next(x for x in code if "result = []" in x)
        msgs.append({"role": "assistant", "content": "", "tool_calls": [_call(
            "write_file", {"path": path, "content": "\n".join(code).replace(old, "    result: list = []")}, 20 + f)]})
        msgs.append({"role": "tool", "content": "ok"})
        msgs.append({"role": "assistant", "content": f"Done: {path} now skips None items; tests pass."})
    return msgs, tools


def _retry(rng: random.Random) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    tools = [_tool("run_shell", "Run a shell command", {"cmd": "string", "timeout": "integer"}),
             _tool("query_db", "Run SQL", {"sql": "string", "database": "string"})]
    msgs: list[dict[str, Any]] = [{"role": "system", "content": "You are an ops agent."}]
    for t in range(rng.randint(3, 5)):
        if rng.random() < 0.5:
            tbl, col = rng.choice(_WORDS), rng.choice(_WORDS)
            sql = f"SELECT id, {col}, created_at FROM {tbl}_events WHERE {col} > {rng.randint(1, 99)} ORDER BY created_at DESC LIMIT 20"
            msgs.append({"role": "user", "content": f"How many recent {tbl} events have a large {col}?"})
            bad = sql.replace("created_at", "created")
            msgs.append({"role": "assistant", "content": "", "tool_calls": [_call("query_db", {"sql": bad, "database": "prod"}, t)]})
            msgs.append({"role": "tool", "content": f'ERROR: column "created" does not exist\nLINE 1: {bad}\nHINT: Perhaps you meant "{tbl}_events.created_at".'})
            msgs.append({"role": "assistant", "content": "The column is created_at; retrying.",
                         "tool_calls": [_call("query_db", {"sql": sql, "database": "prod"}, 50 + t)]})
            msgs.append({"role": "tool", "content": json.dumps({"rows": rng.randint(0, 20), "sql": sql})})
            msgs.append({"role": "assistant", "content": f"The query `{sql}` returned the rows above."})
        else:
            mod = rng.choice(_WORDS)
            cmd = f"python -m pytest tests/test_{mod}.py -k {rng.choice(_VERBS)} -x -q"
            msgs.append({"role": "user", "content": f"Run the {mod} tests."})
            for k in range(rng.randint(1, 3)):
                c = cmd if k == 0 else cmd + " --timeout 120"
                msgs.append({"role": "assistant", "content": "", "tool_calls": [_call("run_shell", {"cmd": c, "timeout": 60 * (k + 1)}, 80 + 3 * t + k)]})
                msgs.append({"role": "tool", "content": f"$ {c}\nTimeout after {60 * (k + 1)}s\nexit status 124"})
            msgs.append({"role": "assistant", "content": f"`{cmd}` keeps timing out; the {mod} tests hang."})
    return msgs, tools


def _plan(rng: random.Random) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    tools = [_tool("run_shell", "Run a shell command", {"cmd": "string"})]
    steps = [f"{rng.choice(_VERBS).capitalize()} the {rng.choice(_WORDS)} {rng.choice(['module', 'service', 'config', 'tests'])}"
             for _ in range(rng.randint(5, 8))]
    msgs: list[dict[str, Any]] = [{"role": "system", "content": "You are a planning agent. Keep the plan updated."},
                                  {"role": "user", "content": "Migrate the project to the new storage backend."}]
    for done in range(len(steps) + 1):
        plan = "\n".join(f"{i + 1}. [{'x' if i < done else ' '}] {s}" for i, s in enumerate(steps))
        call = [_call("run_shell", {"cmd": f"make {steps[done].split()[0].lower()}-{steps[done].split()[2]}"}, done)] if done < len(steps) else None
        m: dict[str, Any] = {"role": "assistant", "content": "Plan:\n" + plan}
        if call:
            m["tool_calls"] = call
        msgs.append(m)
        if call:
            msgs.append({"role": "tool", "content": f"step {done + 1} ok ({rng.randint(1, 40)} files changed)"})
    return msgs, tools


def _echo(rng: random.Random) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    tools = [_tool("read_logs", "Read service logs", {"service": "string", "lines": "integer"}),
             _tool("web_search", "Search the web", {"query": "string"})]
    msgs: list[dict[str, Any]] = [{"role": "system", "content": "You are a support agent. Quote evidence."}]
    for t in range(rng.randint(2, 3)):
        svc = rng.choice(_WORDS) + "-svc"
        msgs.append({"role": "user", "content": f"Why is {svc} failing?"})
        msgs.append({"role": "assistant", "content": "", "tool_calls": [_call("read_logs", {"service": svc, "lines": 30}, t)]})
        logs = [f"2025-03-{rng.randint(10, 28)} 12:{rng.randint(10, 59)}:{rng.randint(10, 59)} {rng.choice(['INFO', 'WARN', 'ERROR'])} "
                f"{svc} {rng.choice(_VERBS)}_{rng.choice(_WORDS)}: {rng.choice(['timeout after 30s', 'connection refused', 'retrying', 'ok', 'disk quota exceeded'])}"
                for _ in range(rng.randint(8, 16))]
        msgs.append({"role": "tool", "content": "\n".join(logs)})
        quoted = rng.sample(logs, min(3, len(logs)))
        msgs.append({"role": "assistant", "content": "The relevant log lines are:\n" + "\n".join(f"> {x}" for x in quoted)
                     + f"\nSo {svc} fails on " + quoted[0].split(": ")[-1] + "."})
        q = f"{svc} {quoted[0].split(': ')[-1]} fix"
        msgs.append({"role": "user", "content": "Search for a fix."})
        msgs.append({"role": "assistant", "content": "", "tool_calls": [_call("web_search", {"query": q}, 10 + t)]})
        res = [f"[{i + 1}] {rng.choice(_WORDS).capitalize()} docs - How to fix '{quoted[0].split(': ')[-1]}' in {svc}: "
               f"increase {rng.choice(_WORDS)}_limit to {rng.randint(2, 64)}" for i in range(3)]
        msgs.append({"role": "tool", "content": "\n".join(res)})
        msgs.append({"role": "assistant", "content": "According to the search result:\n> " + res[0] + "\nI suggest applying that change."})
    return msgs, tools


_BUILDERS = {"tool_json": _tool_json, "file_edit": _file_edit, "retry": _retry, "plan": _plan, "echo": _echo}


def build_trace(kind: str, seed: int) -> AgentTrace:
    if kind not in _BUILDERS:
        raise ValueError(f"unknown trace kind {kind!r}; known: {', '.join(TRACE_KINDS)}")
    rng = random.Random(f"{kind}-{seed}")
    msgs, tools = _BUILDERS[kind](rng)
    return AgentTrace(kind, seed, msgs, tools)


def build_corpus(per_kind: int, seed: int = 0, kinds: Sequence[str] = TRACE_KINDS) -> list[AgentTrace]:
    return [build_trace(k, seed * 10007 + i) for k in kinds for i in range(per_kind)]
