"""``veil serve RUN --ray --replicas 2``: two Ray Serve replicas answer /v1/predict and the v2 infer
with the model's own predictions, both take requests, refusals are the single-process service's; SIGTERM
ends Ray's processes. Set VEIL_SKIP_RAY=1 to skip."""

from __future__ import annotations

import asyncio
import os

import httpx
import numpy as np
import pytest
import torch

from veil.serving.payload import encode_binary, encode_json
from veil.training import load_run, obfuscate

from .conftest import TOKEN

pytestmark = [pytest.mark.processes, pytest.mark.skipif(os.environ.get("VEIL_SKIP_RAY") == "1", reason="VEIL_SKIP_RAY=1")]
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _ray_processes(pid: int) -> list[int]:
    """Processes whose command line names the Ray session of ``pid`` (its gcs_server, raylet, workers)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmd = open(f"/proc/{entry}/cmdline", "rb").read()
            except OSError:
                continue
            if f"_{pid}/".encode() in cmd and b"ray" in cmd:
                found.append(int(entry))
    return found


def test_two_replicas_answer_with_the_models_predictions(runs, start_service):
    pytest.importorskip("ray.serve")
    service = start_service(runs["scnl"], "--ray", "--replicas", "2", wait=False).wait(timeout=240)
    _, task, defense, model = load_run(runs["scnl"])
    m = obfuscate(defense, task.test.x[:40])
    with torch.no_grad():
        expected = model(defense.decode(m)).argmax(1).numpy()
    chunks = [m[i : i + 2].numpy() for i in range(0, 40, 2)]

    async def send_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(headers=AUTH, timeout=60) as client:
            return await asyncio.gather(*(client.post(f"{service.url}/v1/predict", content=b, headers=h) for b, h in map(encode_binary, chunks)))

    answers = asyncio.run(send_all())
    assert [r.status_code for r in answers] == [200] * 20
    assert np.array_equal(np.concatenate([r.json()["predictions"] for r in answers]), expected)
    assert len({r.headers["x-veil-replica"] for r in answers}) == 2  # both replicas took requests
    body, headers = encode_json(m[:3].numpy())
    assert httpx.post(f"{service.url}/v1/predict", content=body, headers={**headers, **AUTH}).json()["predictions"] == expected[:3].tolist()
    assert httpx.post(f"{service.url}/v1/predict", content=body, headers=headers).status_code == 401
    bad, bad_headers = encode_binary(np.full((1, 1, 8, 8), np.nan, np.float32))
    r = httpx.post(f"{service.url}/v1/predict", content=bad, headers={**bad_headers, **AUTH})
    assert r.status_code == 422 and "NaN" in r.json()["detail"]
    httpclient = pytest.importorskip("tritonclient.http")
    inp = httpclient.InferInput("messages", [4, 1, 8, 8], "FP32")
    inp.set_data_from_numpy(m[:4].numpy())
    result = httpclient.InferenceServerClient(service.url.removeprefix("http://")).infer("veil", [inp], headers=dict(AUTH))
    assert result.as_numpy("predictions").tolist() == expected[:4].tolist()
    assert _ray_processes(service.proc.pid)
    service.stop()
    assert service.proc.returncode == 0 and not _ray_processes(service.proc.pid)
