"""Streamed tool calls when one chunk carries several tokens.

SGLang's streaming tool-call detectors advance one step per call: a call's name on one
increment, its arguments on the next. Plain decoding sends one token per chunk, so the parser
never falls behind; a speculative step (ours, EAGLE, n-gram) sends several, and the parser lags
by a step per call. At the end of the stream the lag is lost: SGLang drains the JSON-array
parser (tool_choice=required without a native format) but not the model-format detectors
(hermes, qwen25, llama3, ...), so a chunk that closes one call and holds the whole next one
streams the second call's name and never its arguments, while the non-streamed answer is whole.

The same detectors also leak markup into the streamed content when a marker is split across
chunks in a way single tokens never split it (`</tool_c` + `all>`: SGLang's hermes detector does
so in about a third of random chunkings of a two-call answer).

The fix feeds the detector each chunk the way plain decoding would have: cut about as finely as
a tokenizer cuts (runs of word characters, every other character alone), then runs it on ""
until it stops making progress, so nothing parsed stays unsent when the stream ends.
"""

from __future__ import annotations

import re
from typing import Any, Callable

CHUNK_TARGET = "sglang.srt.function_call.function_call_parser.FunctionCallParser.parse_stream_chunk"
END_TARGET = "sglang.srt.function_call.function_call_parser.FunctionCallParser.parse_stream_end"
ARRAY_TARGET = "sglang.srt.function_call.json_array_parser.JsonArrayParser.parse_streaming_increment"
PIECE = re.compile(r"\w+|\W", re.DOTALL)
MAX_STEPS = 64  # increments one chunk may need: two per call (name, arguments) plus text between


def _progress(calls: list[Any]) -> list[Any]:
    """Calls that carry something: the detectors also report empty argument deltas."""
    return [c for c in calls if c.name or c.parameters]


def pieces(text: str) -> list[str]:
    """A chunk cut about as finely as a tokenizer would: runs of word characters, and every
    other character alone (the detectors' markers and JSON punctuation)."""
    return PIECE.findall(text) if len(text) > 1 else [text]


def drain_chunk(step: Callable[[str], tuple[str, list[Any]]], text: str) -> tuple[str, list[Any]]:
    """`step` on each piece of `text`, then `step("")` while it yields calls: (normal text, calls)."""
    normal, calls = "", []
    for piece in pieces(text):
        t, c = step(piece)
        normal += t or ""
        calls.extend(c)
    for _ in range(MAX_STEPS):
        more_text, more = step("")
        more = _progress(more)
        normal += more_text or ""
        if not more:
            break
        calls.extend(more)
    return normal, calls


def around_parse_stream_chunk(original: Callable[..., Any], parser: Any, chunk_text: str) -> tuple[str, list[Any]]:
    if not parser.tools and not parser.detector.parses_without_tools():
        return original(parser, chunk_text)  # SGLang passes the text through: nothing to parse
    return drain_chunk(lambda t: original(parser, t), chunk_text)


def around_parse_stream_end(original: Callable[..., Any], parser: Any) -> tuple[str, list[Any]]:
    # what the last chunk left parsed but unsent, then the detector's own flush
    text, calls = parser.parse_stream_chunk("")
    end_text, end_calls = original(parser)
    return text + (end_text or ""), calls + list(end_calls)


def around_array_increment(original: Callable[..., Any], parser: Any, new_text: str, tools: Any) -> Any:
    from sglang.srt.function_call.core_types import StreamingParseResult

    def step(t: str) -> tuple[str, list[Any]]:
        r = original(parser, t, tools)
        return r.normal_text, r.calls

    normal, calls = drain_chunk(step, new_text)
    return StreamingParseResult(normal_text=normal, calls=calls)


def register() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(CHUNK_TARGET, around_parse_stream_chunk, HookType.AROUND)
    HookRegistry.register(END_TARGET, around_parse_stream_end, HookType.AROUND)
    HookRegistry.register(ARRAY_TARGET, around_array_increment, HookType.AROUND)
