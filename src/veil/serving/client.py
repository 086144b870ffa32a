"""The client of a ``veil serve`` service: obfuscate locally, send only the message.

    with Client("runs/scnl", "http://127.0.0.1:8000", token) as client:
        predictions = client.predict(x)      # x (N, C, H, W): records never leave this process

``predict`` runs the obfuscator here, with noise from the operating system's entropy
(:func:`veil.training.run.obfuscate`), and posts the messages; the record and any label stay on the
client (``predict`` takes no label). Only ``obfuscator.safetensors`` of a run folder is read.

A request that fails in transit (connection refused or reset, the server restarting) or is answered 503
(busy) is sent again, with exponential backoff, up to ``retries`` times: the *same* message bytes, never a
fresh obfuscation of the same records (an attacker that receives several noisy copies of one record can
average the noise away). Every call returns the predictions or raises :class:`ServiceError`; none is
silently dropped.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

from veil.defenses import Defense
from veil.serving.payload import encode_binary, encode_json

#: Statuses worth sending again: the server is busy or restarting.
RETRY_STATUSES = (502, 503, 504)


class ServiceError(RuntimeError):
    """The service refused a request, or gave no answer after every retry (one line, with the status)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def load_client_obfuscator(run_or_obfuscator: str | Path | Defense) -> Defense:
    """The client's defense: a :class:`Defense`, an ``obfuscator.safetensors`` file or a run folder
    (of which only ``obfuscator.safetensors`` is read)."""
    from veil.defenses.saving import load_obfuscator

    if isinstance(run_or_obfuscator, Defense):
        return run_or_obfuscator.eval()
    path = Path(run_or_obfuscator)
    if path.is_dir():
        path = path / "obfuscator.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no obfuscator (give a run folder or its obfuscator.safetensors)")
    return load_obfuscator(path).eval()


class Client:
    """Obfuscates records locally and queries a ``veil serve`` service with the messages alone.

    Args:
        run_or_obfuscator: A run folder, an ``obfuscator.safetensors`` file or a :class:`Defense`.
        url: The service, e.g. ``http://127.0.0.1:8000``.
        token: The bearer token.
        binary: Send raw float32 (True, the default) or JSON.
        batch_size: Records per request (larger inputs are sent in several requests).
        timeout: Seconds for one try (connect, send, answer).
        retries: Further tries after a transport failure or a 502/503/504.
        backoff: First wait between tries in seconds; doubled each time, at most 5 s, with jitter.
        transport: An httpx transport (tests).
    """

    def __init__(self, run_or_obfuscator: str | Path | Defense, url: str, token: str, *, binary: bool = True, batch_size: int = 256, timeout: float = 10.0, retries: int = 5, backoff: float = 0.1, transport: httpx.BaseTransport | None = None) -> None:
        if not isinstance(token, str) or not token:
            raise ValueError("token must be a non-empty string")
        if int(batch_size) < 1 or int(retries) < 0 or not backoff >= 0 or not timeout > 0:
            raise ValueError(f"need batch_size >= 1, retries >= 0, backoff >= 0, timeout > 0; got {batch_size}, {retries}, {backoff}, {timeout}")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, got {url!r}")
        self.defense = load_client_obfuscator(run_or_obfuscator)
        self.url = url.rstrip("/")
        self.binary = binary
        self.batch_size = int(batch_size)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.attempts = 0  # tries made so far (retries included), for the caller's accounting
        self._http = httpx.Client(timeout=timeout, headers={"Authorization": f"Bearer {token}"}, transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def obfuscate(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """The messages for records ``x`` (N, *input_shape), with fresh OS-entropy noise; no label."""
        from veil.training.run import obfuscate

        x = torch.as_tensor(np.asarray(x, dtype=np.float32)) if not isinstance(x, torch.Tensor) else x.float()
        self.defense.check_input(x)
        return obfuscate(self.defense, x)

    def predict(self, x: torch.Tensor | np.ndarray) -> np.ndarray:
        """Primary predictions (N,) int64 for records ``x``: obfuscated here, messages sent."""
        return self.send(self.obfuscate(x))

    def send(self, messages: torch.Tensor | np.ndarray) -> np.ndarray:
        """Post already-made messages (N, *message_shape); returns the predictions (N,) int64."""
        m = np.asarray(messages.detach().cpu() if isinstance(messages, torch.Tensor) else messages, dtype=np.float32)
        out = [self._post(m[i : i + self.batch_size]) for i in range(0, len(m), self.batch_size)]
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def health(self) -> dict[str, Any]:
        """The service's ``/health`` answer (no retries)."""
        try:
            r = self._http.get(f"{self.url}/health")
        except httpx.HTTPError as err:
            raise ServiceError(f"GET {self.url}/health: {type(err).__name__}: {err}") from err
        if r.status_code != 200:
            raise ServiceError(f"GET {self.url}/health: HTTP {r.status_code}", r.status_code)
        return r.json()

    def _post(self, m: np.ndarray) -> np.ndarray:
        body, headers = encode_binary(m) if self.binary else encode_json(m)
        url = f"{self.url}/v1/predict"
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(5.0, self.backoff * 2 ** (attempt - 1)) * (0.5 + random.random()))
            self.attempts += 1
            try:
                r = self._http.post(url, content=body, headers=headers)
            except httpx.TransportError as err:
                last = f"{type(err).__name__}: {err}"
                continue
            if r.status_code in RETRY_STATUSES:
                last = f"HTTP {r.status_code}: {_detail(r)}"
                continue
            if r.status_code != 200:
                raise ServiceError(f"POST {url}: HTTP {r.status_code}: {_detail(r)}", r.status_code)
            try:
                predictions = np.asarray(r.json()["predictions"], dtype=np.int64)
            except (ValueError, KeyError, TypeError) as err:
                raise ServiceError(f"POST {url}: answer is not a prediction list ({err})", 200) from err
            if predictions.shape != (len(m),):
                raise ServiceError(f"POST {url}: {len(predictions)} predictions for {len(m)} messages", 200)
            return predictions
        raise ServiceError(f"POST {url}: no answer after {self.retries + 1} tries (last: {last})")


def _detail(r: httpx.Response) -> str:
    try:
        return str(r.json()["detail"])
    except (ValueError, KeyError, TypeError):
        return r.text[:200].strip() or r.reason_phrase
