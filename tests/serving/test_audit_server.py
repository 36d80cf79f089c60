"""`agentserve audit` on the suite's fp32 plain/AGENTSPARK pair: lossless decoding leaves nothing
flagged, and a speculative server that really decodes something else (here: its requests carry
a frequency penalty the plain ones do not) is caught at a gap far above the bound."""

from __future__ import annotations

import pytest

from agentserve import audit

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def prompts(model_dir):
    from transformers import AutoTokenizer

    return audit.load_prompts(3, AutoTokenizer.from_pretrained(model_dir))


def test_lossless_pair_has_nothing_flagged(plain_server, agentspark_server, prompts) -> None:
    r = audit.audit(agentspark_server.url, plain_server.url, prompts, "float32", concurrency=3, max_new=48)
    assert r.prompts == 3 and r.identical + len(r.divergences) == 3
    assert not r.flagged, [d for d in r.divergences]


def test_a_real_difference_is_flagged(plain_server, agentspark_server, prompts) -> None:
    r = audit.audit(agentspark_server.url, plain_server.url, prompts, "float32", concurrency=3, max_new=48,
                    spec_extra={"frequency_penalty": 2.0})
    assert r.flagged, r.summary()
    d = r.flagged[0]
    assert d.pair_gap > audit.BOUNDS["float32"] and d.plain_token != d.spec_token


def test_control_compares_plain_at_a_batch_with_plain_alone(plain_server, prompts) -> None:
    # --control: the plain server at 3 clients against itself one at a time (fp32: no divergence
    # beyond the bound, the same bound the speculative pair is held to)
    r = audit.audit(plain_server.url, plain_server.url, prompts, "float32", concurrency=3, max_new=48,
                    plain_concurrency=1, pair="plain@3 vs plain@1")
    s = r.summary()
    assert s["pair"] == "plain@3 vs plain@1" and s["concurrency"] == 3
    assert r.identical + len(r.divergences) == 3 and not r.flagged, s
