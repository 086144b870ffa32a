"""Run a federated config on one machine: Flower's simulation engine (Ray) or a small in-process grid.

``inprocess`` calls the ClientApp directly from a :class:`flwr.serverapp.Grid` that lives in this
process (fast, deterministic; used by the tests). It fills a message's ID the way Flower's own
``InMemoryGrid`` does (a Flower internal, hence flwr is pinned to 1.42.x). ``simulation`` is Flower's
simulation runtime with its Ray backend (each client a virtual SuperNode; ~25-30 s of start-up here).
Both run the same ServerApp main (:func:`veil.federated.server_app.run_server`) and the same ClientApp.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Callable
from uuid import uuid4

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.serverapp import Grid

from veil.federated.task import FederatedConfig, load_federated_task, partition_indices

BACKENDS = ("inprocess", "simulation")


class InProcessGrid(Grid):
    """A Grid whose nodes are ClientApp calls in this process, one Context per node."""

    def __init__(self, client_app: ClientApp, num_nodes: int, *, run_id: int = 1) -> None:
        if num_nodes < 1:
            raise ValueError(f"num_nodes must be >= 1, got {num_nodes!r}")
        self.client_app = client_app
        self._run = Run.create_empty(run_id)
        # Message() reads the sender's identity from here; Flower's own simulation sets it the same way
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SUPERLINK_NODE_ID
        self.contexts = {
            1000 + i: Context(run_id=run_id, node_id=1000 + i, node_config={"partition-id": i, "num-partitions": num_nodes}, state=RecordDict(), run_config={})
            for i in range(num_nodes)
        }
        self._replies: dict[str, Message] = {}

    def set_run(self, run: Run) -> None:  # noqa: D102
        self._run = run

    @property
    def run(self) -> Run:  # noqa: D102
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None) -> Message:  # noqa: D102
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Deliver each message to its node's ClientApp now; keep the reply for ``pull_messages``."""
        ids = []
        for msg in messages:
            if msg.metadata.dst_node_id not in self.contexts:
                raise ValueError(f"no node {msg.metadata.dst_node_id}; nodes: {sorted(self.contexts)}")
            msg.metadata.__dict__["_message_id"] = str(uuid4())  # as flwr's InMemoryGrid does
            reply = self.client_app(msg, self.contexts[msg.metadata.dst_node_id])
            self._replies[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # noqa: D102
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:  # noqa: D102
        return self.pull_messages(self.push_messages(messages))


def check_clients(config: FederatedConfig) -> None:
    """Raise ``ValueError`` early, before anything is written: the task, a split that cannot give every
    client its records, the server model, the defense and its options, a shared obfuscator file."""
    from veil.federated.task import client_obfuscator, new_model, new_obfuscator

    task = load_federated_task(config)
    partition_indices(task.train.z.numpy(), config.clients, config.partition, alpha=config.alpha, seed=config.seed)
    new_model(config)
    if config.obfuscator is not None:
        client_obfuscator(config, 0, task.train, task=task)  # loads the file and checks it fits the task
    else:
        new_obfuscator(config, task)


def run_federated(config: FederatedConfig, out: str | Path, *, backend: str = "inprocess", log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run ``config`` into run folder ``out`` on ``backend`` (``inprocess`` or ``simulation``)."""
    from veil.federated.client_app import app as client_app
    from veil.federated.server_app import make_server_app, run_server

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    from veil.training.run import check_output_folder

    check_output_folder(Path(out))
    check_clients(config)
    t0 = time.time()
    if backend == "inprocess":
        result = run_server(InProcessGrid(client_app, config.clients), config, out, backend=backend, log=log)
    else:
        from flwr.simulation import run_simulation

        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        run_simulation(
            server_app=make_server_app(config, out, backend=backend),
            client_app=client_app,
            num_supernodes=config.clients,
            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": min(2, os.cpu_count() or 1), "include_dashboard": False}},
        )
        from veil.io import read_json

        if not (Path(out) / "federated.json").exists():
            raise RuntimeError(f"the Flower simulation ended without writing {Path(out) / 'federated.json'}; see its log above")
        result = read_json(Path(out) / "federated.json")
    log(f"{out}: {config.rounds} round(s) with {config.clients} clients on backend {backend!r} in {time.time() - t0:.1f}s")
    return result
