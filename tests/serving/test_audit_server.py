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
