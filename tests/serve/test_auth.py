"""--api-key (tessera/serve/auth.py) and --served-model-name, on the keyed_server fixture."""

from __future__ import annotations

import httpx
import openai
import pytest
from conftest import API_KEY, SERVED_NAMES

GOOD = {"prompt": "Hi", "max_tokens": 1}


@pytest.mark.parametrize("method,path", [("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
                                         ("GET", "/v1/models"), ("POST", "/tokenize"), ("POST", "/detokenize")])
@pytest.mark.parametrize("auth", [None, "Bearer wrong-key", f"Basic {API_KEY}", API_KEY, f"Bearer {API_KEY}x"])
def test_every_api_route_needs_the_key(keyed_server, method, path, auth):
    url, _ = keyed_server
    headers = {"Authorization": auth} if auth is not None else {}
    r = httpx.request(method, url + path, json=GOOD if method == "POST" else None, headers=headers, timeout=60)
    assert r.status_code == 401, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_api_key" and "Authorization: Bearer" in err["message"]
    assert r.headers["www-authenticate"] == "Bearer"


def test_health_and_metrics_stay_open_and_the_key_opens_the_rest(keyed_server):
    url, _ = keyed_server
    assert httpx.get(url + "/health").status_code == 200
    assert httpx.get(url + "/metrics").status_code == 200
    for scheme in ("Bearer", "bearer"):  # the scheme is case-insensitive (RFC 7235)
        r = httpx.post(url + "/v1/completions", json=GOOD, headers={"Authorization": f"{scheme} {API_KEY}"})
        assert r.status_code == 200, r.text


def test_openai_client_with_the_key_and_without(keyed_server):
    url, _ = keyed_server
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()
    client = openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
    assert [m.id for m in client.models.list().data] == SERVED_NAMES
    for name in SERVED_NAMES:  # a request may name any served name; responses carry the first
        r = client.completions.create(model=name, prompt="Hi", max_tokens=1)
        assert r.model == SERVED_NAMES[0]
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="SmolLM2", prompt="Hi", max_tokens=1)
    assert "`tessera-test`, `SmolLM2-135M-Instruct`" in e.value.body["message"]
