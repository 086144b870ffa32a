"""Slow clients against the header timeout: sockets that send their headers a byte at a time do not stop
a normal client from being answered, and the server closes each of them once the timeout passes."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import numpy as np

from veil.serving.payload import encode_binary

from .conftest import TOKEN

HEAD = f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/octet-stream\r\n".encode()


def _dribble(port: int, closed: list[float], stop: threading.Event) -> None:
    """Send HEAD one byte every 0.2 s until the server closes the socket (its time goes to ``closed``)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=15)
    t0 = time.monotonic()
    try:
        for byte in HEAD:
            if stop.is_set():
                return
            s.sendall(bytes([byte]))
            time.sleep(0.2)
        return  # all headers sent without being cut: not recorded as closed
    except OSError:  # reset or broken pipe: the server closed it
        closed.append(time.monotonic() - t0)
    finally:
        s.close()


def test_slow_header_senders_are_closed_and_do_not_block_others(patient_service):
    closed: list[float] = []
    stop = threading.Event()
    threads = [threading.Thread(target=_dribble, args=(patient_service.port, closed, stop), daemon=True) for _ in range(20)]
    for t in threads:
        t.start()
    time.sleep(0.5)  # every slow socket is open and sending
    body, headers = encode_binary(np.zeros((1, 1, 8, 8), np.float32))
    r = httpx.post(f"{patient_service.url}/v1/predict", content=body, headers={**headers, "Authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert r.status_code == 200 and len(r.json()["predictions"]) == 1
    for t in threads:
        t.join(30)
    stop.set()
    # each had sent a few bytes of a ~130-byte header when the 1 s timeout closed it (writes then fail)
    assert len(closed) == 20
