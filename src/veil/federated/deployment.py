"""veil's federated run as real Flower processes (SuperLink, SuperNodes, ``flwr run``), where nodes may fail.

The ServerApp here is :func:`veil.federated.server_app.run_server` with two things a deployment needs:

* **minimums** (run-config key ``min-clients``): a round goes ahead with every SuperNode still connected
  as long as at least that many are, so a SuperNode that dies mid-run is left out instead of stalling the
  run (the strategy's default waits for all ``clients``). A SuperNode that shuts down is dropped at once; one
  that is killed outright is dropped when the SuperLink misses its heartbeats (Flower 1.42: 2 x 30 s).
* **participation** (``RUN/participation.json``, rewritten atomically after every exchange): for each
  train or evaluate exchange, the round, the node ids the server sent to, those that replied and those
  that failed (with Flower's error reason). Node ids are Flower's (each SuperNode logs its own as
  ``SuperNode ID: ...``); they are written as strings, being 64-bit.

Point a Flower app project's ``[tool.flwr.app.components] serverapp`` at ``veil.federated.deployment:app``
(``examples/federated/pyproject.toml`` does).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp import strategy as strategies
from flwr.supercore.run import Run

from veil.federated.server_app import build_strategy, config_from_run_config, run_server
from veil.federated.task import FederatedConfig
from veil.io import read_json, write_json

PARTICIPATION_FILE = "participation.json"


def tolerant_strategy(config: FederatedConfig, min_clients: int) -> strategies.Strategy:
    """``build_strategy(config)`` training every connected node each round, as long as ``min_clients`` are."""
    if not 1 <= min_clients <= config.clients:
        raise ValueError(f"min-clients must be between 1 and clients ({config.clients}), got {min_clients}")
    strategy = build_strategy(config)
    strategy.min_train_nodes = min_clients
    strategy.min_available_nodes = min_clients
    return strategy


class ParticipationGrid(Grid):
    """A Grid that passes everything to ``grid`` and records who answered each exchange in ``path``."""

    def __init__(self, grid: Grid, path: str | Path) -> None:
        self.grid = grid
        self.path = Path(path)
        # a resumed run keeps the record of the exchanges before the interruption
        self.exchanges: list[dict[str, Any]] = read_json(self.path)["exchanges"] if self.path.exists() else []

    def set_run(self, run: Run) -> None:  # noqa: D102
        self.grid.set_run(run)

    @property
    def run(self) -> Run:  # noqa: D102
        return self.grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None) -> Message:  # noqa: D102
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # noqa: D102
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # noqa: D102
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Send, wait for the replies (or Flower's error replies for nodes gone offline), record them."""
        messages = list(messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        if messages:
            sent = [m.metadata.dst_node_id for m in messages]
            ok = {r.metadata.src_node_id for r in replies if r.has_content()}
            # an error reply comes from the SuperLink itself: find its node through the message it answers
            node_of = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
            errors = {node_of.get(r.metadata.reply_to_message_id): r.error.reason for r in replies if r.has_error()}
            config = messages[0].content.config_records.get("config")
            self.exchanges.append({
                "type": messages[0].metadata.message_type,
                "round": int(config["server-round"]) if config is not None and "server-round" in config else None,
                "sent": [str(n) for n in sent],
                "replied": [str(n) for n in sent if n in ok],
                "failed": {str(n): errors.get(n, "no reply") for n in sent if n not in ok},
            })
            write_json(self.path, {"exchanges": self.exchanges})
        return replies


def deployment_keys(run_config: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """Split Flower's run config into veil's keys and ``min-clients`` (0 or absent: every client)."""
    rc = dict(run_config)
    min_clients = rc.pop("min-clients", 0)
    if isinstance(min_clients, bool) or not isinstance(min_clients, int) or min_clients < 0:
        raise ValueError(f"min-clients must be a non-negative integer, got {min_clients!r}")
    return rc, min_clients


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """The ServerApp ``flwr run`` starts: veil's run config, tolerant minimums, participation recorded."""
    rc, min_clients = deployment_keys(context.run_config)
    config, out = config_from_run_config(rc)
    strategy = tolerant_strategy(config, min_clients or config.clients)
    recording = ParticipationGrid(grid, Path(out) / PARTICIPATION_FILE)
    run_server(recording, config, out, backend="deployment", strategy=strategy)
