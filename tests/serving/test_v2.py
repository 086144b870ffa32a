"""The Open Inference Protocol v2 through a real client (tritonclient): health, model metadata, infer
with binary and JSON tensors agreeing with /v1 and with the model run locally, refusals as v2 errors."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
import torch

from veil.serving import v2
from veil.serving.payload import PayloadError, encode_binary
from veil.training import load_run, obfuscate

from .conftest import TOKEN

httpclient = pytest.importorskip("tritonclient.http")
AUTH = {"Authorization": f"Bearer {TOKEN}"}  # copied per call: tritonclient adds its own headers to the dict it is given


@pytest.fixture(scope="module")
def messages_and_expected(runs):
    _, task, defense, model = load_run(runs["scnl"])
    m = obfuscate(defense, task.test.x[:12]).numpy().astype(np.float32)
    with torch.no_grad():
        expected = model(defense.decode(torch.from_numpy(m))).argmax(1).numpy()
    return m, expected


def _client(service):
    return httpclient.InferenceServerClient(url=service.url.removeprefix("http://"))


def test_health_and_metadata_through_tritonclient(scnl_service):
    client = _client(scnl_service)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("veil")
    meta = client.get_model_metadata("veil")
    assert meta["inputs"] == [{"name": "messages", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert meta["outputs"] == [{"name": "predictions", "datatype": "INT64", "shape": [-1]}]
    assert not client.is_model_ready("other")
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]


@pytest.mark.parametrize("binary_in,binary_out", [(True, True), (False, False), (True, False), (False, True)])
def test_infer_round_trip_equals_v1_and_the_local_model(scnl_service, messages_and_expected, binary_in, binary_out):
    m, expected = messages_and_expected
    inp = httpclient.InferInput("messages", list(m.shape), "FP32")
    inp.set_data_from_numpy(m, binary_data=binary_in)
    out = httpclient.InferRequestedOutput("predictions", binary_data=binary_out)
    result = _client(scnl_service).infer("veil", [inp], outputs=[out], headers=dict(AUTH), request_id="r1")
    got = result.as_numpy("predictions")
    assert got.dtype == np.int64 and np.array_equal(got, expected)
    assert result.get_response()["id"] == "r1"
    body, headers = encode_binary(m)
    v1 = httpx.post(f"{scnl_service.url}/v1/predict", content=body, headers={**headers, **AUTH}).json()["predictions"]
    assert v1 == got.tolist()


def test_default_outputs_come_back_binary(scnl_service, messages_and_expected):
    """With no outputs named, tritonclient asks for binary outputs (binary_data_output)."""
    m, expected = messages_and_expected
    inp = httpclient.InferInput("messages", list(m.shape), "FP32")
    inp.set_data_from_numpy(m)
    result = _client(scnl_service).infer("veil", [inp], headers=dict(AUTH))
    assert np.array_equal(result.as_numpy("predictions"), expected)
    assert result.get_response()["outputs"][0]["parameters"]["binary_data_size"] == 8 * len(m)


def test_refusals_are_v2_errors(scnl_service, messages_and_expected):
    m, _ = messages_and_expected
    client = _client(scnl_service)
    inp = httpclient.InferInput("messages", list(m.shape), "FP32")
    inp.set_data_from_numpy(m)
    with pytest.raises(httpclient.InferenceServerException, match="missing bearer token"):
        client.infer("veil", [inp])
    with pytest.raises(httpclient.InferenceServerException, match="unknown model 'resnet'"):
        client.infer("resnet", [inp], headers=dict(AUTH))
    bad = httpclient.InferInput("messages", [2, 1, 8, 7], "FP32")
    bad.set_data_from_numpy(np.zeros((2, 1, 8, 7), np.float32))
    with pytest.raises(httpclient.InferenceServerException, match=r"must have shape \(B, 1, 8, 8\)") as err:
        client.infer("veil", [bad], headers=dict(AUTH))
    assert err.value.status() == "400"
    nan = httpclient.InferInput("messages", [1, 1, 8, 8], "FP32")
    nan.set_data_from_numpy(np.full((1, 1, 8, 8), np.nan, np.float32))
    with pytest.raises(httpclient.InferenceServerException, match="NaN or infinite"):
        client.infer("veil", [nan], headers=dict(AUTH))


HEAD = {"inputs": [{"name": "messages", "shape": [1, 1, 8, 8], "datatype": "FP32", "parameters": {"binary_data_size": 256}}]}
PARSE_REFUSALS = [
    ("header length past the body", json.dumps(HEAD).encode() + b"\0" * 256, "99999", "JSON header's length"),
    ("binary size disagrees", json.dumps(HEAD).encode() + b"\0" * 252, None, "binary_data_size 256 does not match"),
    ("two inputs", json.dumps({"inputs": [HEAD["inputs"][0]] * 2}).encode(), None, "exactly one input"),
    ("wrong input name", json.dumps({"inputs": [{**HEAD["inputs"][0], "name": "x"}]}).encode(), None, "unknown input 'x'"),
    ("FP64", json.dumps({"inputs": [{**HEAD["inputs"][0], "datatype": "FP64"}]}).encode(), None, "datatype FP32"),
    ("negative shape", json.dumps({"inputs": [{"name": "messages", "shape": [-1, 1, 8, 8], "datatype": "FP32", "data": []}]}).encode(), None, "non-negative integers"),
    ("data of strings", json.dumps({"inputs": [{"name": "messages", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": ["1"] * 64}]}).encode(), None, "numbers only"),
    ("too few values", json.dumps({"inputs": [{"name": "messages", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 63}]}).encode(), None, "needs 64 values"),
    ("unknown output", json.dumps({"inputs": [{"name": "messages", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 64}], "outputs": [{"name": "logits"}]}).encode(), None, "unknown output 'logits'"),
]


@pytest.mark.parametrize("what,body,length,words", PARSE_REFUSALS, ids=[r[0] for r in PARSE_REFUSALS])
def test_parse_refusals(what, body, length, words):
    header_length = length if length is not None else (str(len(json.dumps(HEAD))) if b"\0" in body else None)
    with pytest.raises(PayloadError) as err:
        v2.parse_infer(body, header_length, message_shape=(1, 8, 8), max_batch=64, max_json_batch=16)
    assert words in str(err.value) and "\n" not in str(err.value)
