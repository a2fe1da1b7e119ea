"""The multi-stage (BAGEL) server under the property-based fuzz: its own path -- text chat
through the AR stage and vLLM's renderer (text2text, img2text) -- never answers >= 500,
and the server serves afterwards. The routes shared with diffusion-only servers are
fuzzed in test_fuzz.py."""

from __future__ import annotations

import collections

import pytest
import requests
from hypothesis import HealthCheck, given, settings

from .fuzz import requests_for, send

pytestmark = pytest.mark.engine

CHAT = "/v1/chat/completions"


def test_fuzz_text_chat_never_5xx(omni_server):
    server = omni_server("bagel")
    counts: collections.Counter = collections.Counter()

    @settings(max_examples=60, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
    @given(requests_for("text_chat"))
    def one(request):
        send(server, request, counts)

    one()
    print("\nBAGEL text-chat fuzz statuses:", dict(counts))
    assert counts[200] > 0, counts
    assert requests.get(server.url + "/health", timeout=10).status_code == 200
    r = requests.post(server.url + CHAT, json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
                      headers=server.headers(), timeout=120)
    assert r.status_code == 200, r.text
