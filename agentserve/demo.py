"""`agentserve demo`: a short multi-turn agent conversation with one tool call, through the
official `openai` client, against a running server or one started from a profile."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "city name"}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


def fake_weather(city: str) -> dict[str, object]:
    """The demo's tool: deterministic, so runs can be compared."""
    return {"city": city, "temperature_c": 18, "conditions": "light rain"}


def run_conversation(base_url: str, agent_id: str = "demo-agent", out=sys.stdout) -> list[dict]:
    import openai

    client = openai.OpenAI(base_url=base_url.rstrip("/") + "/v1", api_key="agentserve", max_retries=0)
    headers = {"x-agent-id": agent_id}
    messages: list[dict] = [
        {"role": "system", "content": "You are a helpful assistant. Use tools when they help."},
        {"role": "user", "content": "What's the weather in Paris right now?"},
    ]
    print(f"user      > {messages[-1]['content']}", file=out)
    t0 = time.monotonic()
    # The first turn must call the tool: a 135M model rarely decides to on its own, so the
    # agent asks for it by name (SGLang then constrains the output to a valid call).
    first = client.chat.completions.create(
        model="default", messages=messages, tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0, max_tokens=64, extra_headers=headers,
    )
    msg = first.choices[0].message
    calls = msg.tool_calls or []
    if not calls:
        raise RuntimeError(f"the model did not call the tool (finish_reason={first.choices[0].finish_reason}, content={msg.content!r})")
    call = calls[0]
    args = json.loads(call.function.arguments)
    print(f"assistant > tool call {call.function.name}({json.dumps(args)})  [{time.monotonic() - t0:.1f}s]", file=out)
    messages.append({"role": "assistant", "content": msg.content or "", "tool_calls": [c.model_dump() for c in calls]})
    result = fake_weather(str(args.get("city", "")))
    messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)})
    print(f"tool      > {json.dumps(result)}", file=out)

    t1 = time.monotonic()
    second = client.chat.completions.create(
        model="default", messages=messages, tools=[WEATHER_TOOL], tool_choice="none",
        temperature=0, max_tokens=64, extra_headers=headers,
    )
    answer = second.choices[0].message.content or ""
    print(f"assistant > {answer.strip()}  [{time.monotonic() - t1:.1f}s]", file=out)
    messages.append({"role": "assistant", "content": answer})
    return messages


def run_demo(profile_path: str | None = None, url: str | None = None) -> int:
    if url:
        run_conversation(url)
        return 0
    from agentserve.server.procs import ServerProcess
    from agentserve.profile import load_profile

    prof = load_profile(profile_path or Path(__file__).resolve().parent.parent / "profiles" / "cpu-demo.yaml")
    log = Path("agentserve-demo-server.log").resolve()
    print(f"starting SGLang ({prof.name}); server log: {log}", file=sys.stderr)
    with ServerProcess(prof, log_path=log) as srv:
        print(f"server healthy at {srv.url} after {srv.start_seconds:.0f}s", file=sys.stderr)
        run_conversation(srv.url)
    return 0
