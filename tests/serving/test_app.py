"""The service over real HTTP: answers, every refusal (401, 403, 408, 413, 415, 422, 503), health, docs
and metrics; the server-side split loads no client weights."""

from __future__ import annotations

import json
import re
import socket
import time

import httpx
import numpy as np
import pytest
import torch

from veil.client import Client
from veil.serving.payload import encode_binary, encode_json
from veil.serving.split import check_splittable, load_server_side
from veil.training import load_run, obfuscate

from .conftest import TOKEN

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def post(url: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(f"{url}/v1/predict", content=body, headers=headers, timeout=10)


def test_predictions_equal_the_model_run_locally(runs, scnl_service):
    """The oracle: the server's answer for a batch of messages is the trained model's argmax on them."""
    _, task, defense, model = load_run(runs["scnl"])
    m = obfuscate(defense, task.test.x[:100])
    with torch.no_grad():
        expected = model(defense.decode(m)).argmax(1).numpy()
    for binary in (True, False):
        with Client(defense, scnl_service.url, TOKEN, binary=binary, batch_size=16) as client:
            assert np.array_equal(client.send(m), expected)
    # and the end-to-end accuracy is the run's own (well above the 0.5 of a constant answer)
    with Client(runs["scnl"], scnl_service.url, TOKEN) as client:
        acc = float((client.predict(task.test.x) == task.test.y.numpy()).mean())
    assert acc > 0.7


def _binary(shape, values=None) -> tuple[bytes, dict[str, str]]:
    a = np.zeros(shape, np.float32) if values is None else np.asarray(values, np.float32)
    return encode_binary(a)


GOOD, GOOD_HEADERS = _binary((2, 1, 8, 8))

REFUSALS = [
    # (what, body, headers, status, words in the one-line detail)
    ("no token", GOOD, GOOD_HEADERS, 401, "missing bearer token"),
    ("not a bearer token", GOOD, {**GOOD_HEADERS, "Authorization": f"Basic {TOKEN}"}, 401, "missing bearer token"),
    ("wrong token", GOOD, {**GOOD_HEADERS, "Authorization": "Bearer " + "x" * len(TOKEN)}, 403, "not accepted"),
    ("a prefix of the token", GOOD, {**GOOD_HEADERS, "Authorization": f"Bearer {TOKEN[:-1]}"}, 403, "not accepted"),
    ("oversized body", b"\0" * 200_004, {**AUTH, "Content-Type": "application/octet-stream", "X-Veil-Shape": "50001"}, 413, "exceeds the limit"),
    ("text body", b"hello", {**AUTH, "Content-Type": "text/plain"}, 415, "unsupported Content-Type"),
    ("no content type", GOOD, {**AUTH, "X-Veil-Shape": "2,1,8,8"}, 415, "unsupported Content-Type"),
    ("wrong message shape", *_binary((2, 1, 8, 7)), 422, "must have shape (B, 1, 8, 8)"),
    ("shape header lies about size", GOOD, {**GOOD_HEADERS, "X-Veil-Shape": "3,1,8,8"}, 422, "needs 768 bytes"),
    ("no shape header", GOOD, {"Content-Type": "application/octet-stream"}, 422, "needs the header X-Veil-Shape"),
    ("garbage shape header", GOOD, {**GOOD_HEADERS, "X-Veil-Shape": "2;1;8;8"}, 422, "comma-separated integers"),
    ("empty batch", b"", {**GOOD_HEADERS, "X-Veil-Shape": "0,1,8,8"}, 422, "1 to 512 messages"),
    ("batch over the limit", *_binary((513, 1, 8, 8)), 422, "1 to 512 messages"),
    ("NaN in binary", *_binary((1, 1, 8, 8), np.full((1, 1, 8, 8), np.nan)), 422, "NaN or infinite"),
    ("inf in binary", *_binary((1, 1, 8, 8), np.full((1, 1, 8, 8), np.inf)), 422, "NaN or infinite"),
    ("NaN in JSON", b'{"messages": [[[[NaN]]]]}', {"Content-Type": "application/json"}, 422, "finite numbers"),
    ("not JSON", b"{messages", {"Content-Type": "application/json"}, 422, "not valid JSON"),
    ("JSON without messages", b'{"x": 1}', {"Content-Type": "application/json"}, 422, '{"messages"'),
    ("JSON strings", json.dumps({"messages": [[[["1"] * 8] * 8]]}).encode(), {"Content-Type": "application/json"}, 422, "numbers only"),
    ("JSON booleans", json.dumps({"messages": [[[[True] * 8] * 8]]}).encode(), {"Content-Type": "application/json"}, 422, "numbers only"),
    ("ragged JSON", json.dumps({"messages": [[[[0.0] * 8] * 7 + [[0.0] * 3]]]}).encode(), {"Content-Type": "application/json"}, 422, "rectangular"),
    ("JSON batch over its limit", *encode_json(np.zeros((17, 1, 8, 8))), 422, "1 to 16 messages"),
]


@pytest.mark.parametrize("what,body,headers,status,words", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refusals(scnl_service, what, body, headers, status, words):
    if status not in (401, 403) and "Authorization" not in headers:
        headers = {**headers, **AUTH}
    r = post(scnl_service.url, body, headers)
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert words in detail and "\n" not in detail
    if status == 401:
        assert r.headers["WWW-Authenticate"] == "Bearer"


def test_a_good_request_passes_the_same_checks(scnl_service):
    """The refusals above are not the server refusing everything."""
    r = post(scnl_service.url, GOOD, {**GOOD_HEADERS, **AUTH})
    assert r.status_code == 200 and len(r.json()["predictions"]) == 2


def _slow_request(port: int) -> socket.socket:
    """A client that sends its headers and half its body, then stalls."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    head = f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/octet-stream\r\nX-Veil-Shape: 1,1,8,8\r\nContent-Length: 256\r\n\r\n"
    s.sendall(head.encode() + b"\0" * 100)
    return s


def _read_response(s: socket.socket) -> str:
    """The whole HTTP response on ``s``: headers, then as many body bytes as Content-Length says (a
    response may arrive in several TCP segments; one recv can return the headers alone)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            return data.decode()
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    while length and len(body) < int(length.group(1)):
        chunk = s.recv(4096)
        if not chunk:
            break
        body += chunk
    return (head + b"\r\n\r\n" + body).decode()


def test_slow_clients_time_out_and_a_full_server_answers_503(scnl_service):
    """Two stalled clients fill --max-concurrency 2: the next request is answered 503 at once (not
    queued); each stalled one gets 408 after --body-timeout 1; then the server answers again."""
    stalled = [_slow_request(scnl_service.port) for _ in range(2)]
    deadline = time.monotonic() + 5
    while _count(httpx.get(f"{scnl_service.url}/metrics", headers=AUTH).text, "veil_requests_in_flight") < 2:
        assert time.monotonic() < deadline, "the stalled requests never reached the app"
        time.sleep(0.01)
    r = post(scnl_service.url, GOOD, {**GOOD_HEADERS, **AUTH})
    # 503, not 200: refused while both slots are held, not queued until one frees
    assert r.status_code == 503 and r.headers["Retry-After"] == "1", r.text
    for s in stalled:
        answer = _read_response(s)
        s.close()
        assert answer.startswith("HTTP/1.1 408"), answer[:200]
        assert "did not arrive within 1 s" in answer
    assert post(scnl_service.url, GOOD, {**GOOD_HEADERS, **AUTH}).status_code == 200


def test_health_docs_and_metrics(scnl_service):
    url = scnl_service.url
    health = httpx.get(f"{url}/health").json()
    assert health["status"] == "ok" and health["defense"] == "scnl" and health["message_shape"] == [1, 8, 8]
    spec = httpx.get(f"{url}/openapi.json").json()
    assert set(spec["paths"]["/v1/predict"]["post"]["responses"]) >= {"200", "401", "403", "408", "413", "415", "422", "503"}
    assert "application/octet-stream" in spec["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    assert httpx.get(f"{url}/docs").status_code == 200
    assert httpx.get(f"{url}/metrics").status_code == 401
    before = _count(httpx.get(f"{url}/metrics", headers=AUTH).text, 'veil_requests_total{endpoint="predict",status="200"}')
    for _ in range(3):
        assert post(url, GOOD, {**GOOD_HEADERS, **AUTH}).status_code == 200
    assert post(url, GOOD, GOOD_HEADERS).status_code == 401
    text = httpx.get(f"{url}/metrics", headers=AUTH).text
    assert _count(text, 'veil_requests_total{endpoint="predict",status="200"}') == before + 3
    assert _count(text, 'veil_request_errors_total{reason="unauthenticated"}') >= 1
    assert _count(text, 'veil_request_seconds_count{endpoint="predict"}') >= before + 4
    assert _count(text, "veil_batch_records_sum") >= 6


def _count(text: str, series: str) -> float:
    m = re.search(re.escape(series) + r" ([0-9.e+]+)", text)
    return float(m.group(1)) if m else 0.0


def test_svd_is_split_and_served(runs, services):
    """SVD's server keeps W and the basis (decode); the client's conv block is not loaded there."""
    server = load_server_side(runs["svd"])
    _, task, defense, model = load_run(runs["svd"])
    assert server.message_shape == (defense.kept(),)
    with pytest.raises(RuntimeError, match="not loaded on the server"):
        server.decoder.client(task.test.x[:2])
    assert not [k for k in server.decoder.state_dict() if k.startswith("client.")]
    assert set(server.decoder.state_dict()) == {"server_layer.weight", "server_layer.bias", "basis", "singular_values"}
    m = obfuscate(defense, task.test.x[:64])
    with torch.no_grad():
        expected = model(defense.decode(m)).argmax(1).numpy()
    service = services["svd"]
    with Client(runs["svd"], service.url, TOKEN) as client:
        assert np.array_equal(client.send(m), expected)
    body, headers = _binary((2, 1, 8, 8))  # a record-shaped body: not what an svd client sends
    assert post(service.url, body, headers).status_code == 401  # the token is checked first
    r = post(service.url, body, {**headers, **AUTH})
    assert r.status_code == 422 and f"(B, {defense.kept()})" in r.json()["detail"]


def test_identity_split_and_refused_defenses(runs):
    server = load_server_side(runs["none"])
    assert server.decoder is None and server.message_shape == (1, 8, 8)
    with pytest.raises(ValueError, match="cannot be served.*supported: none"):
        check_splittable("sample-and-hold")


def test_a_bad_request_in_a_batch_is_refused_alone(runs, patient_service):
    """Seven requests sent together, one with a NaN: that one gets 422, the six others their own
    predictions, and they shared forward passes (fewer passes than requests)."""
    import asyncio

    _, task, defense, model = load_run(runs["scnl"])
    m = obfuscate(defense, task.test.x[:12])
    with torch.no_grad():
        expected = model(defense.decode(m)).argmax(1).numpy()
    chunks = [m[2 * i : 2 * i + 2].numpy() for i in range(6)]
    bodies = [encode_binary(c) for c in chunks]
    bodies.insert(3, _binary((1, 1, 8, 8), np.full((1, 1, 8, 8), np.nan)))
    url = patient_service.url

    def passes() -> float:
        return _count(httpx.get(f"{url}/metrics", headers=AUTH).text, "veil_batch_records_count")

    async def send_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(headers=AUTH, timeout=30) as client:
            return await asyncio.gather(*(client.post(f"{url}/v1/predict", content=b, headers=h) for b, h in bodies))

    before = passes()
    answers = asyncio.run(send_all())
    assert [r.status_code for r in answers] == [200, 200, 200, 422, 200, 200, 200]
    assert "NaN" in answers[3].json()["detail"]
    got = [r.json()["predictions"] for i, r in enumerate(answers) if i != 3]
    assert got == [expected[2 * i : 2 * i + 2].tolist() for i in range(6)]
    assert passes() - before < 6
