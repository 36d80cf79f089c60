"""Our DSpark worker (AGENTSPARK) inside the real SGLang server on this CPU: lossless against
plain decoding (greedy byte-identical; sampled distribution equal), statistics in meta_info and
Prometheus, and plain decoding when the drafter is broken."""

from __future__ import annotations

import collections
import json
import time
from pathlib import Path

import pytest
import requests
from scipy.stats import chi2_contingency

from agentserve.demo import WEATHER_TOOL

pytestmark = pytest.mark.server

GREEDY_PROMPTS = [
    "Write a Python function that checks whether a string is a palindrome, with a docstring and two examples.",
    "Give me three tips for sleeping better.",
    "Explain what a hash map is in two sentences.",
]


def chat(prompt: str) -> str:
    """The bundled model's chat format, so it answers instead of ending at once."""
    return f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"


def gen(url: str, body: dict, agent: str | None = None) -> dict | list:
    r = requests.post(url + "/generate", json=body, timeout=900, headers={"x-agent-id": agent} if agent else {})
    r.raise_for_status()
    return r.json()


def test_captured_features_are_the_drafters_layers(agentspark_server, model_dir) -> None:
    """The worker's target features for layer l equal HF transformers' hidden_states[l+1]
    (DeepSpec's "output of layer l"), so drafters trained offline see what they were trained on."""
    import torch
    from transformers import AutoModelForCausalLM

    from sglang_ext.dspark.config import DSparkConfig

    dump = Path(agentspark_server.log_path).parent / "agentspark-first-prefill-features.pt"
    gen(agentspark_server.url, {"text": "The quick brown fox jumps over the lazy dog because",
                                "sampling_params": {"temperature": 0, "max_new_tokens": 2}})
    d = torch.load(dump)
    layers = DSparkConfig.from_pretrained(str(Path(__file__).resolve().parents[2] / "drafters" / "smollm2-135m-dspark")).target_layer_ids
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        hs = model(torch.tensor([d["input_ids"]]), output_hidden_states=True).hidden_states
    width = d["features"].shape[1] // len(layers)
    for i, layer in enumerate(layers):
        ours = d["features"][:, i * width:(i + 1) * width]
        torch.testing.assert_close(ours, hs[layer + 1][0], rtol=1e-4, atol=1e-3)


def test_greedy_identical_to_plain(plain_server, agentspark_server) -> None:
    steps = 0
    for p in GREEDY_PROMPTS:
        body = {"text": chat(p), "sampling_params": {"temperature": 0, "max_new_tokens": 40}}
        a, b = gen(plain_server.url, body), gen(agentspark_server.url, body)
        assert b["output_ids"] == a["output_ids"], (p, a["text"], b["text"])
        steps += b["meta_info"].get("spec_verify_ct", 0)
    assert steps > 0  # the speculative path really ran


def test_greedy_tool_call_turn_identical(plain_server, agentspark_server) -> None:
    # A constrained (grammar) tool call and the turn after it, through the OpenAI API.
    msgs = [{"role": "user", "content": "What's the weather in Rome?"}]
    kw = dict(model="default", tools=[WEATHER_TOOL], tool_choice="required", temperature=0, max_tokens=48, messages=msgs)
    outs = [requests.post(s.url + "/v1/chat/completions", json=kw, timeout=900).json() for s in (plain_server, agentspark_server)]
    calls = [o["choices"][0]["message"]["tool_calls"] for o in outs]
    assert calls[0] and calls[1]
    assert [c["function"] for c in calls[0]] == [c["function"] for c in calls[1]]
    msgs += [{"role": "assistant", "content": "", "tool_calls": calls[0]},
             {"role": "tool", "tool_call_id": calls[0][0]["id"], "content": json.dumps({"temperature_c": 22, "conditions": "sunny"})}]
    kw.update(messages=msgs, tool_choice="none")
    texts = [requests.post(s.url + "/v1/chat/completions", json=kw, timeout=900).json()["choices"][0]["message"]["content"]
             for s in (plain_server, agentspark_server)]
    assert texts[0] == texts[1]


def _samples(url: str, n: int) -> list[list[int]]:
    prompt = "My favourite fruit is"
    body = {"text": [prompt] * n,
            "sampling_params": [{"temperature": 1.0, "max_new_tokens": 3} for _ in range(n)]}  # unseeded: rejection sampling
    return [o["output_ids"] for o in gen(url, body) if len(o["output_ids"]) >= 3]


def _two_sample_chi2(a: collections.Counter, b: collections.Counter, min_count: int = 10) -> tuple[float, int]:
    """Chi-square homogeneity test; outcomes rarer than `min_count` (both samples) are pooled."""
    common = [k for k, _ in (a + b).most_common() if a[k] + b[k] >= min_count]
    rows = [[c[k] for k in common] + [sum(c.values()) - sum(c[k] for k in common)] for c in (a, b)]
    if rows[0][-1] + rows[1][-1] == 0:
        rows = [r[:-1] for r in rows]
    return float(chi2_contingency(rows)[1]), len(common)


def test_sampled_distribution_matches_plain(plain_server, agentspark_server) -> None:
    n = 300
    a = _samples(plain_server.url, n)
    before = _source_counts(agentspark_server.url)
    b = _samples(agentspark_server.url, n)
    after = _source_counts(agentspark_server.url)
    print("drafts verified by source:", {k: after[k] - before[k] for k in after})
    # Tokens 2 and 3 come out of speculative verification (token 1 is sampled at prefill);
    # their marginals are compared separately (pairs would spread the counts too thin).
    for pos in (1, 2):
        pvalue, cells = _two_sample_chi2(collections.Counter(o[pos] for o in a), collections.Counter(o[pos] for o in b))
        assert cells >= 3, f"token {pos + 1}: too few frequent outcomes for a distribution test"
        # A sampler that verified greedily (SGLang's CPU tree verify does) collapses the
        # distribution and fails this at any seed; a correct one passes at the 0.05% level.
        assert pvalue > 5e-4, (pos, pvalue)


def _source_counts(url: str, name: str = "agentserve:spec_source_verified_drafts_total") -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = collections.defaultdict(float)
    for fam in text_string_to_metric_families(requests.get(url + "/metrics", timeout=60).text):
        for s in fam.samples:
            if s.name == name:
                out[s.labels["source"]] += s.value
    return out


def test_repeated_prompt_drafts_from_the_radix_tree(plain_server, agentspark_server) -> None:
    # An agent retrying the same call: the second time, the radix tree holds what followed this
    # exact sequence, so the worker copies it; the output stays identical to plain decoding. Two
    # agents: the shared index is per agent, so only the radix tree (global) holds the answer.
    # How many copied tokens each step verifies is the planner's choice from this CPU's measured
    # step costs (a CPU whose kernels make 3-token steps dear verifies one per step, as a CI
    # machine did), so the checks are the source, its acceptance and a floor, not a width.
    body = {"text": chat("Write a Python class for a bank account with deposit and withdraw methods."),
            "sampling_params": {"temperature": 0, "max_new_tokens": 48}}
    ref = gen(plain_server.url, body)
    first = gen(agentspark_server.url, body, agent="radix-first")
    acc0 = _source_counts(agentspark_server.url, "agentserve:spec_source_accepted_drafts_total")
    ver0 = _source_counts(agentspark_server.url, "agentserve:spec_source_verified_drafts_total")
    again = gen(agentspark_server.url, body, agent="radix-again")
    acc1 = _source_counts(agentspark_server.url, "agentserve:spec_source_accepted_drafts_total")
    ver1 = _source_counts(agentspark_server.url, "agentserve:spec_source_verified_drafts_total")
    assert first["output_ids"] == ref["output_ids"] and again["output_ids"] == ref["output_ids"]
    copied = acc1["radix"] - acc0["radix"]
    accepted = sum(acc1[s] - acc0[s] for s in acc1)
    assert copied >= 0.25 * len(ref["output_ids"]), (acc0, acc1)  # at least one per two steps
    assert copied >= 0.8 * accepted, (acc0, acc1)  # the radix tree, not the drafter, supplied them
    assert copied >= 0.9 * (ver1["radix"] - ver0["radix"]), (ver0, ver1)  # and they were right
    assert again["meta_info"]["spec_accept_length"] > 1.5, again["meta_info"]


def _counter(url: str, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for fam in text_string_to_metric_families(requests.get(url + "/metrics", timeout=60).text)
               for s in fam.samples if s.name == name)


def test_second_turn_drafter_context_seeded_from_the_first(plain_server, agentspark_server) -> None:
    """The second turn's prefill skips what the radix cache holds (the first turn's prompt and
    answer), so its drafter context for those positions comes from the first turn's request
    (spec/contexts.py); the answer stays plain decoding's."""
    first = chat("Write a Python function that returns the n-th Fibonacci number.")
    body = {"text": first, "sampling_params": {"temperature": 0, "max_new_tokens": 32}}
    a1 = gen(agentspark_server.url, body)
    assert a1["output_ids"] == gen(plain_server.url, body)["output_ids"]
    before = _counter(agentspark_server.url, "agentserve:drafter_context_seeded_positions_total")
    second = {"text": first + a1["text"] + "<|im_end|>\n" + chat("Now make it iterative."),
              "sampling_params": {"temperature": 0, "max_new_tokens": 32}}
    b = gen(agentspark_server.url, second)
    seeded = _counter(agentspark_server.url, "agentserve:drafter_context_seeded_positions_total") - before
    assert b["output_ids"] == gen(plain_server.url, second)["output_ids"]
    # at least the first prompt's positions (the radix cache holds them at page granularity)
    assert seeded >= a1["meta_info"]["prompt_tokens"] - 16, (seeded, a1["meta_info"]["prompt_tokens"])
    assert seeded < b["meta_info"]["prompt_tokens"]


def test_concurrent_mixed_widths_identical_to_plain(plain_server, agentspark_server) -> None:
    # One request repeats an earlier answer (long radix copies) while three new ones decode
    # beside it in the same batch: ragged verify steps, each request only its own block.
    import concurrent.futures as cf

    repeat = chat("List five colours of the rainbow, one per line.")
    fresh = [chat(p) for p in ("Name two planets.", "What is 7 times 8?", "Say hello in French.")]
    sp = {"temperature": 0, "max_new_tokens": 40}
    gen(agentspark_server.url, {"text": repeat, "sampling_params": sp})  # now in the radix tree
    ref = [gen(plain_server.url, {"text": t, "sampling_params": sp})["output_ids"] for t in [repeat] + fresh]
    before = _counter(agentspark_server.url, "agentserve:verify_ragged_steps_total")
    with cf.ThreadPoolExecutor(4) as ex:
        got = list(ex.map(lambda t: gen(agentspark_server.url, {"text": t, "sampling_params": sp})["output_ids"],
                          [repeat] + fresh))
    assert got == ref
    assert _counter(agentspark_server.url, "agentserve:verify_ragged_steps_total") > before  # ragged steps ran


@pytest.fixture(scope="module")
def uniform_verify_server(start_server):
    """AGENTSPARK with the ragged layout off: the uniform padded TARGET_VERIFY batch SGLang's own
    attention backends read (what the worker sends to any backend without ragged support)."""
    from agentserve.profile import load_profile

    base = load_profile(Path(__file__).resolve().parents[1] / "profiles" / "agentspark-fp32.yaml")
    return start_server("agentspark-fp32.yaml", name="test-agentspark-uniform",
                        drafter=base.drafter.model_copy(update={"ragged_verify": False}))


def test_uniform_verify_fallback_identical_to_plain(plain_server, uniform_verify_server) -> None:
    # The batch of test_concurrent_mixed_widths_identical_to_plain, verified in the uniform
    # layout: greedy output still plain decoding's, drafts really verified, no ragged step.
    import concurrent.futures as cf

    url = uniform_verify_server.url
    repeat = chat("List five colours of the rainbow, one per line.")
    fresh = [chat(p) for p in ("Name two planets.", "What is 7 times 8?", "Say hello in French.")]
    sp = {"temperature": 0, "max_new_tokens": 40}
    gen(url, {"text": repeat, "sampling_params": sp})  # now in the radix tree
    ref = [gen(plain_server.url, {"text": t, "sampling_params": sp})["output_ids"] for t in [repeat] + fresh]
    before = sum(_source_counts(url).values())
    with cf.ThreadPoolExecutor(4) as ex:
        got = list(ex.map(lambda t: gen(url, {"text": t, "sampling_params": sp})["output_ids"], [repeat] + fresh))
    assert got == ref
    assert sum(_source_counts(url).values()) > before  # drafts were verified (multi-position steps)
    assert _counter(url, "agentserve:verify_ragged_steps_total") == 0


def test_sampled_with_radix_copies_matches_plain(plain_server, agentspark_server) -> None:
    # Sampled requests that repeat a prompt: later ones get continuations copied from the radix
    # tree or the shared index (earlier samples) and verified as deterministic drafts. Two clients at a time keep
    # the batch small enough that copying pays on this CPU (so copies really are verified).
    import concurrent.futures as cf

    prompt = "Count from 1 to 20: 1, 2, 3,"

    def body(_: int) -> dict:  # unseeded: rejection sampling of copied drafts (seeded rows verify by matching)
        return {"text": prompt, "sampling_params": {"temperature": 1.0, "top_k": 3, "max_new_tokens": 6}}

    ref = gen(plain_server.url, {"text": [prompt] * 400, "sampling_params": [body(20000 + i)["sampling_params"] for i in range(400)]})
    before = _source_counts(agentspark_server.url)
    with cf.ThreadPoolExecutor(2) as ex:
        got = list(ex.map(lambda i: gen(agentspark_server.url, body(30000 + i)), range(160)))
    after = _source_counts(agentspark_server.url)
    # copies really were verified: from the radix tree or the shared index (both learn from earlier
    # samples of this prompt; which of the two offers a given draft depends on timing)
    copied = sum(after[s] - before[s] for s in ("radix", "shared", "session"))
    assert copied >= 100, (before, after)
    a = collections.Counter(tuple(o["output_ids"]) for o in ref)
    b = collections.Counter(tuple(o["output_ids"]) for o in got)
    pvalue, cells = _two_sample_chi2(a, b, min_count=5)
    assert cells >= 1 and sum(a.values()) - max(a.values()) >= 10  # the target is not one outcome only
    # whole 6-token outputs: a verifier that over-accepted copies would inflate the common one
    assert pvalue > 5e-4, (pvalue, a.most_common(4), b.most_common(4))


def test_worker_metrics_exported(agentspark_server) -> None:
    gen(agentspark_server.url, {"text": "List five colours:", "sampling_params": {"temperature": 0, "max_new_tokens": 16}})
    text = requests.get(agentspark_server.url + "/metrics", timeout=60).text
    for name in ("agentserve:verify_width_count", "agentserve:spec_step_seconds_count", "agentserve:verify_budget_tokens_sum",
                 "agentserve:draft_index_session_tokens", "agentserve:draft_index_shared_tokens", "agentserve:draft_index_sessions"):
        assert name in text, name
    sessions = [float(l.split()[-1]) for l in text.splitlines() if l.startswith("agentserve:draft_index_sessions")]
    assert sessions and all(v >= 0 for v in sessions)


@pytest.fixture(scope="module")
def broken_drafter_server(tmp_path_factory, start_server):
    from agentserve.profile import DrafterSpec

    bad = tmp_path_factory.mktemp("bad-drafter")
    (bad / "config.json").write_text(json.dumps({"block_size": 7, "hidden_size": -1}))
    return start_server("agentspark-fp32.yaml", drafter=DrafterSpec(algorithm="agentspark", path=str(bad), num_draft_tokens=8))


def test_broken_drafter_falls_back_to_plain(plain_server, broken_drafter_server) -> None:
    body = {"text": chat(GREEDY_PROMPTS[1]), "sampling_params": {"temperature": 0, "max_new_tokens": 24}}
    assert gen(broken_drafter_server.url, body)["output_ids"] == gen(plain_server.url, body)["output_ids"]
    text = requests.get(broken_drafter_server.url + "/metrics", timeout=60).text
    line = next(l for l in text.splitlines() if l.startswith('agentserve:drafter_fallback_total{reason="load"}'))
    assert float(line.split()[-1]) >= 1


WRITE_TOOL = {"type": "function", "function": {
    "name": "write_file", "description": "Write text to a file",
    "parameters": {"type": "object", "properties": {"path": {"type": "string"}, "content": {"type": "string"}},
                   "required": ["path", "content"]}}}
NOTE = ("def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\n"
        "def mul(a, b):\n    return a * b\n")


def test_streamed_tool_call_deltas_equal_the_whole_call_under_multi_token_steps(agentspark_server) -> None:
    """Each speculative step can emit several tokens; the streamed tool-call deltas, reassembled
    by index, must equal the non-streamed call (a known bug class in engines' tool parsers)."""
    import openai

    agent = "stream-tester"
    c = openai.OpenAI(base_url=agentspark_server.url + "/v1", api_key="x", max_retries=0, timeout=900,
                      default_headers={"x-agent-id": agent})
    msgs = [{"role": "system", "content": "You save files exactly as given."},
            {"role": "user", "content": f"Save this file as math_ops.py, unchanged:\n{NOTE}"},
            {"role": "assistant", "content": "", "tool_calls": [{"id": "call_0", "type": "function", "function": {
                "name": "write_file", "arguments": json.dumps({"path": "math_ops.py", "content": NOTE})}}]},
            {"role": "tool", "tool_call_id": "call_0", "content": "error: disk busy, try again"},
            {"role": "user", "content": "Try again with the same file."}]
    kw = dict(model="default", messages=msgs, tools=[WRITE_TOOL], tool_choice="required", temperature=0, max_tokens=120)
    whole = c.chat.completions.create(**kw)
    calls = whole.choices[0].message.tool_calls
    assert calls, whole.choices[0].message

    args: dict[int, str] = collections.defaultdict(str)
    names: dict[int, str] = {}
    arg_chunks = 0
    for ch in c.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}):
        if not ch.choices:
            continue
        for tc in ch.choices[0].delta.tool_calls or []:
            if tc.function and tc.function.name:
                names[tc.index] = tc.function.name
            if tc.function and tc.function.arguments:
                args[tc.index] += tc.function.arguments
                arg_chunks += 1
    assert [names[i] for i in sorted(names)] == [x.function.name for x in calls]
    assert [json.loads(args[i]) for i in sorted(args)] == [json.loads(x.function.arguments) for x in calls]

    # the steps really emitted several tokens at once (copied from the earlier, failed call)
    text = requests.get(agentspark_server.url + "/metrics", timeout=60).text
    val = {n: float(l.split()[-1]) for l in text.splitlines() for n in ("steps", "tokens")
           if l.startswith(f'agentserve:agent_spec_{n}_total{{agent="{agent}"}}')}
    assert val["tokens"] / val["steps"] > 1.5, val
    # the agent API reads the scheduler's load report, written at most every few tenths of a second
    # (with a trailing write after the last step): it agrees with the counters once that write is in
    deadline = time.monotonic() + 15
    while True:
        row = next(a for a in requests.get(agentspark_server.url + "/agentserve/v1/agents", timeout=60).json()["agents"]
                   if a["agent_id"] == agent)
        if row["accept_length"] == pytest.approx(val["tokens"] / val["steps"]) or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    assert row["accept_length"] == pytest.approx(val["tokens"] / val["steps"]) and row["copy_share"] > 0
    share = row["source_share"]  # the console's drill-down: copies by source, and the model's
    assert set(share) == {"session", "shared", "radix", "model"} and sum(share.values()) == pytest.approx(1.0)
    assert share["session"] + share["shared"] + share["radix"] == pytest.approx(row["copy_share"])


@pytest.fixture(scope="module")
def mixed_chunk_server():
    """AGENTSPARK with SGLang's --enable-mixed-chunk (stopped when this module ends)."""
    from agentserve.server.procs import ServerProcess
    from agentserve.profile import load_profile

    prof = load_profile(Path(__file__).resolve().parents[1] / "profiles" / "agentspark-fp32.yaml")
    prof = prof.model_copy(update={"server": prof.server.model_copy(update={"extra_args": ["--enable-mixed-chunk"]})})
    srv = ServerProcess(prof, log_path=Path(__file__).resolve().parents[2] / ".pytest_cache" / "server-logs" / "agentspark-mixed.log")
    srv.start(timeout=900)
    try:
        yield srv
    finally:
        srv.stop()


def test_mixed_chunk_steps_identical_to_plain(plain_server, agentspark_server, mixed_chunk_server) -> None:
    # Requests arrive while others decode, so their prefills run in mixed steps: the running
    # requests decode one token each in the same batch, then go on drafting. Greedy outputs
    # must stay plain decoding's. Without mixed chunk the same arrivals stall the running
    # streams, which the worker's prefill-stall counter records.
    import concurrent.futures as cf
    import time

    texts = [chat(p) for p in ("Write a Python function that reverses a linked list.", "Count from 1 to 30.",
                               "Name three planets and one fact each.", "Write a bash loop that prints 1..10.")]

    def run(url: str) -> list[list[int]]:
        def one(i: int) -> list[int]:
            time.sleep(0.8 * i)
            return gen(url, {"text": texts[i], "sampling_params": {"temperature": 0, "max_new_tokens": 48}})["output_ids"]

        with cf.ThreadPoolExecutor(len(texts)) as ex:
            return list(ex.map(one, range(len(texts))))

    stall = "agentserve:tier_prefill_stall_seconds_total"
    ref = run(plain_server.url)
    stall0 = _counter(agentspark_server.url, stall)
    assert run(agentspark_server.url) == ref
    stalled = _counter(agentspark_server.url, stall) - stall0
    assert stalled > 0  # running streams waited on the later arrivals' prefills
    before = _counter(mixed_chunk_server.url, "agentserve:spec_mixed_steps_total")
    mixed_stall0 = _counter(mixed_chunk_server.url, stall)
    got = run(mixed_chunk_server.url)
    assert got == ref
    assert _counter(mixed_chunk_server.url, "agentserve:spec_mixed_steps_total") > before  # mixed steps ran
    assert _counter(mixed_chunk_server.url, "agentserve:spec_accepted_drafts_total") > 0  # and speculation
    assert _counter(mixed_chunk_server.url, stall) - mixed_stall0 < stalled  # mixed steps keep them decoding


def test_stop_strings_and_stop_ids_end_where_plain_ends(plain_server, agentspark_server) -> None:
    """A stop string or stop token inside a multi-token step: the answer ends where plain's ends.
    The same prompt is sent once without a stop first, so the radix tree holds its whole answer
    and the next step copies far past the stop."""
    prompt = chat("List the planets of the solar system in order, one per line.")
    full = {"text": prompt, "sampling_params": {"temperature": 0, "max_new_tokens": 48}}
    ref = gen(plain_server.url, full)
    assert gen(agentspark_server.url, full)["output_ids"] == ref["output_ids"]
    text, ids = ref["text"], ref["output_ids"]
    stop_str = text[len(text) // 2: len(text) // 2 + 4]  # some text mid-answer
    stop_id = ids[len(ids) // 2]
    before = _counter(agentspark_server.url, "agentserve:spec_source_verified_drafts_total")
    for sp in ({"stop": [stop_str]}, {"stop_token_ids": [stop_id]}, {"stop": [stop_str], "no_stop_trim": True}):
        body = {"text": prompt, "sampling_params": {"temperature": 0, "max_new_tokens": 48, **sp}}
        a, b = gen(plain_server.url, body), gen(agentspark_server.url, body)
        assert len(a["output_ids"]) < len(ids), (sp, a["text"])  # the stop really cut the answer
        assert (b["text"], b["output_ids"], b["meta_info"]["finish_reason"]) == (
            a["text"], a["output_ids"], a["meta_info"]["finish_reason"]), sp
    assert _counter(agentspark_server.url, "agentserve:spec_source_verified_drafts_total") > before  # copies ran
