"""Streamed tool calls when chunks carry several tokens (sglang_ext/http/tool_stream.py).

SGLang's own parsers, fed a model's tool-call text cut into random multi-character chunks
(a speculative step sends several tokens at once), must stream what they stream when fed one
character at a time, the way plain decoding feeds them: every call's name and whole arguments.
The CI failure this came from is pinned as the chunks the server sent."""

from __future__ import annotations

import inspect
import json
import random
from typing import Any, Callable

import pytest
from sglang.srt.entrypoints.openai.protocol import Tool
from sglang.srt.function_call.function_call_parser import FunctionCallParser
from sglang.srt.function_call.json_array_parser import JsonArrayParser

from agentserve.demo import WEATHER_TOOL
from sglang_ext.http import tool_stream

TOOLS = [Tool(**WEATHER_TOOL)]
CALLS = [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "London"})]
# each parser's format for the two calls above, as the model writes it
TEXTS = {
    "hermes": '<tool_call>{"name":"get_weather", "arguments":{"city": "Paris"}}</tool_call>\n'
              '<tool_call>{"name":"get_weather", "arguments":{"city": "London"}}</tool_call>',
    "qwen25": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
              '<tool_call>\n{"name": "get_weather", "arguments": {"city": "London"}}\n</tool_call>',
    "llama3": '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; '
              '{"name": "get_weather", "parameters": {"city": "London"}}',
}
ARRAY_TEXT = '[{"name": "get_weather", "parameters": {"city": "Paris"}}, {"name": "get_weather", "parameters": {"city": "London"}}]'
# what the speculative server sent in the failing CI run (hermes, tool_choice=required)
CI_CHUNKS = ['<', 'tool_call>{"name":"get_weather", "arguments":{"', 'city": "Paris"}}</tool_call>\n<tool_',
             'call>{"name":"get_weather", "arguments":{"city":', ' "London"}}</tool_call>']

RAW_CHUNK = inspect.unwrap(FunctionCallParser.parse_stream_chunk)  # SGLang's, without our hook
RAW_END = inspect.unwrap(FunctionCallParser.parse_stream_end)
RAW_ARRAY = inspect.unwrap(JsonArrayParser.parse_streaming_increment)


def fixed_chunk(p: Any, t: str) -> tuple[str, list]:
    return tool_stream.around_parse_stream_chunk(RAW_CHUNK, p, t)


def fixed_end(p: Any) -> tuple[str, list]:
    # the hook's own parse_stream_chunk("") goes through whatever is installed: pin it to ours
    text, calls = fixed_chunk(p, "")
    end_text, end_calls = RAW_END(p)
    return text + end_text, calls + end_calls


def collect(chunks: list[str], chunk: Callable, end: Callable, parser: Any) -> tuple[str, dict, dict]:
    """(content, names by call index, arguments by call index) as a client assembles them."""
    content, names, args = "", {}, {}
    for text, calls in [*(chunk(parser, c) for c in chunks), end(parser)]:
        content += text or ""
        for call in calls:
            if call.name:
                names[call.tool_index] = call.name
            if call.parameters:
                args[call.tool_index] = args.get(call.tool_index, "") + call.parameters
    return content, names, args


def as_calls(names: dict, args: dict) -> list[tuple[str, Any]]:
    assert sorted(names) == sorted(args), (names, args)
    return [(names[i], json.loads(args[i])) for i in sorted(names)]


def random_chunks(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, len(text) // 4)))
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


def test_ci_chunks_lose_the_second_calls_arguments_without_the_hook_and_not_with_it() -> None:
    _, names, args = collect(CI_CHUNKS, RAW_CHUNK, RAW_END, FunctionCallParser(TOOLS, "hermes"))
    assert sorted(names) == [0, 1] and sorted(args) == [0]  # SGLang 0.5.23's behaviour
    _, names, args = collect(CI_CHUNKS, fixed_chunk, fixed_end, FunctionCallParser(TOOLS, "hermes"))
    assert as_calls(names, args) == CALLS


@pytest.mark.parametrize("fmt", sorted(TEXTS))
def test_multi_token_chunks_stream_what_single_tokens_stream(fmt: str) -> None:
    text = TEXTS[fmt]
    one = collect(list(text), RAW_CHUNK, RAW_END, FunctionCallParser(TOOLS, fmt))
    assert as_calls(one[1], one[2]) == CALLS
    rng = random.Random(7)
    raw_lost = 0
    for _ in range(300):
        chunks = random_chunks(text, rng)
        content, names, args = collect(chunks, fixed_chunk, fixed_end, FunctionCallParser(TOOLS, fmt))
        assert as_calls(names, args) == CALLS, chunks
        assert content.strip() == one[0].strip(), chunks
        _, n, a = collect(chunks, RAW_CHUNK, RAW_END, FunctionCallParser(TOOLS, fmt))
        raw_lost += sorted(n) != sorted(a)
    print(f"{fmt}: SGLang's own parser lost arguments in {raw_lost} of 300 chunkings")


def test_json_array_chunks_stream_each_call_as_its_text_arrives() -> None:
    """tool_choice=required without a native format: SGLang drains the array parser only at the
    end; with the hook a call's arguments go out in the chunk that completes them."""
    rng = random.Random(11)
    for _ in range(300):
        chunks = random_chunks(ARRAY_TEXT, rng)
        p = JsonArrayParser()
        names, args, done_at = {}, {}, {}
        for k, c in enumerate(chunks):
            r = tool_stream.around_array_increment(RAW_ARRAY, p, c, TOOLS)
            for call in r.calls:
                if call.name:
                    names[call.tool_index] = call.name
                if call.parameters:
                    args[call.tool_index] = args.get(call.tool_index, "") + call.parameters
            for i in range(2):
                if i not in done_at and i in args:
                    try:
                        json.loads(args[i])
                        done_at[i] = k
                    except ValueError:
                        pass
        assert as_calls(names, args) == CALLS, chunks
        seen = "".join(chunks)
        # the first call's arguments went out with the chunk that closed its object
        close = ARRAY_TEXT.index('}}') + 2
        cum = [len("".join(chunks[: k + 1])) for k in range(len(chunks))]
        assert done_at[0] == next(k for k, n in enumerate(cum) if n >= close), (chunks, done_at)
        assert seen == ARRAY_TEXT


def test_hook_targets_name_sglang_functions() -> None:
    """The plugin patches these by dotted name: a renamed SGLang function must fail here, not
    silently leave the server without the fix."""
    import importlib

    for target in (tool_stream.CHUNK_TARGET, tool_stream.END_TARGET, tool_stream.ARRAY_TARGET):
        module, cls, fn = target.rsplit(".", 2)
        assert callable(getattr(getattr(importlib.import_module(module), cls), fn)), target


def test_without_tools_the_text_passes_through_untouched() -> None:
    p = FunctionCallParser([], "hermes")
    assert fixed_chunk(p, 'Say <tool_call>{"x": 1}') == ('Say <tool_call>{"x": 1}', [])
