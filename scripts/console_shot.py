"""Take docs/console.svg: the console against a real AGENTSPARK server (profiles/cpu-dspark.yaml)
while several agents of different tiers run multi-turn tool-call conversations on it."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import openai

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agentserve.demo import WEATHER_TOOL  # noqa: E402
from agentserve.server.procs import ServerProcess  # noqa: E402
from agentserve.profile import load_profile  # noqa: E402

AGENTS = [("planner-1", "interactive"), ("coder-2", "standard"), ("coder-3", "standard"), ("indexer-4", "batch")]


def agent_loop(url: str, agent: str, tier: str, stop: threading.Event) -> None:
    c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=600,
                      default_headers={"x-agent-id": agent, "x-agent-tier": tier})
    city = ["Oslo", "Paris", "Lima", "Kyoto"][hash(agent) % 4]
    while not stop.is_set():
        msgs = [{"role": "system", "content": "You are a helpful agent with tools."},
                {"role": "user", "content": f"What's the weather in {city}? Then write a short Python function that formats it."}]
        try:
            r = c.chat.completions.create(model="default", messages=msgs, tools=[WEATHER_TOOL], tool_choice="required",
                                          temperature=0, max_tokens=48)
            call = r.choices[0].message.tool_calls[0]
            msgs += [{"role": "assistant", "content": "", "tool_calls": [call.model_dump()]},
                     {"role": "tool", "tool_call_id": call.id, "content": '{"city": "%s", "temperature_c": 11}' % city}]
            c.chat.completions.create(model="default", messages=msgs, tools=[WEATHER_TOOL], temperature=0, max_tokens=64)
        except openai.APIStatusError:
            time.sleep(1)  # queued/refused by the tier gate: back off
        except openai.APIConnectionError:
            return  # the server is shutting down after the screenshot


def main() -> int:
    out = sys.argv[1] if len(sys.argv) > 1 else str(REPO / "docs" / "console.svg")
    prof = load_profile(REPO / "profiles" / "cpu-dspark.yaml")
    with ServerProcess(prof, log_path=Path("/tmp/console-shot-server.log")) as srv:
        stop = threading.Event()
        threads = [threading.Thread(target=agent_loop, args=(srv.url, a, t, stop), daemon=True) for a, t in AGENTS]
        for t in threads:
            t.start()
        time.sleep(30)
        rc = subprocess.call([sys.executable, "-m", "agentserve.cli", "console", "--url", srv.url,
                              "--screenshot", out, "--after", "20"], cwd=REPO)
        stop.set()
        return rc


if __name__ == "__main__":
    sys.exit(main())
