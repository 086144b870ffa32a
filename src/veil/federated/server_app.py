"""Flower ServerApp: a Flower strategy (FedAvg, FedProx, FedAdam, ...) aggregates the clients' updates.

After every round (and before the first), the global model is evaluated by the clients on their own
test shards, obfuscated by their own obfuscators (Flower evaluate messages; accuracies weighted by
the shard sizes). Each round's accuracies and the global weights are saved atomically, so an
interrupted run resumes at the last finished round (exact for fedavg/fedprox/fedmedian; the server
optimiser state of fedadam/fedyogi/fedadagrad restarts).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Callable

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp import strategy as strategies
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from veil.defenses.saving import save_obfuscator
from veil.federated.task import FederatedConfig, aggregates_obfuscator, global_obfuscator, initial_state, unpack
from veil.io import load_weights, read_json, save_weights, write_json
from veil.training.run import open_run_folder


def build_strategy(config: FederatedConfig) -> strategies.Strategy:
    """The Flower strategy named by ``config.strategy``; every client trains every round."""
    common = dict(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=config.clients, min_available_nodes=config.clients, min_evaluate_nodes=0)
    if config.strategy == "fedavg":
        return strategies.FedAvg(**common)
    if config.strategy == "fedprox":
        return strategies.FedProx(**common, proximal_mu=config.proximal_mu)
    if config.strategy == "fedmedian":
        return strategies.FedMedian(**common)
    cls = {"fedadam": strategies.FedAdam, "fedyogi": strategies.FedYogi, "fedadagrad": strategies.FedAdagrad}[config.strategy]
    return cls(**common, eta=config.server_lr)


def evaluate_on_clients(grid: Grid, arrays: ArrayRecord, config: FederatedConfig, server_round: int) -> dict[str, float]:
    """Send the global model to every node for evaluation and aggregate (weighted by shard size)."""
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"veil-config": config.to_json(), "server-round": server_round})})
    messages = [Message(content=content, dst_node_id=nid, message_type=MessageType.EVALUATE) for nid in grid.get_node_ids()]
    replies = [r for r in grid.send_and_receive(messages) if r.has_content()]
    if not replies:
        raise RuntimeError(f"no client answered the evaluation of round {server_round}")
    agg = aggregate_metricrecords([r.content for r in replies], "num-examples")
    return {k: float(v) for k, v in agg.items() if k != "num-examples"}


def run_server(
    grid: Grid, config: FederatedConfig, out: str | Path, *, backend: str = "", strategy: strategies.Strategy | None = None, log: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Run ``config.rounds`` rounds of federated training on ``grid``; write the run folder ``out``.

    Files: ``config.json``, ``rounds.json`` + ``checkpoint.safetensors`` (after every round),
    ``federated.json``, ``accuracy_per_round.png``, ``model.safetensors`` (the final global model) and,
    where the obfuscator is aggregated, ``obfuscator.safetensors`` (the final global obfuscator). With
    ``config.attack_epochs`` every round also attacks what the clients' engines received
    (:func:`veil.federated.privacy.attack_round`).
    """
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    out = Path(out)
    finished = open_run_folder(out, config, "federated.json", what="federated run", log=log)
    if finished is not None:
        return finished

    history: list[dict[str, Any]] = []
    state = initial_state(config)
    if (out / "rounds.json").exists() and (out / "checkpoint.safetensors").exists():
        history = read_json(out / "rounds.json")["rounds"]
        saved = load_weights(out / "checkpoint.safetensors")
        if set(saved) != set(state):
            raise ValueError(f"{out}/checkpoint.safetensors does not hold this run's global state")
        state = saved
        log(f"{out}: resuming after round {history[-1]['round']}")
    done = history[-1]["round"] if history else -1
    t0 = time.time()

    def evaluate_fn(local_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        server_round = local_round + max(done, 0)
        if local_round == 0 and done >= 0:
            return None  # round already evaluated before the interruption
        accs = evaluate_on_clients(grid, arrays, config, server_round)
        rec: dict[str, Any] = {"round": server_round, **accs}
        if local_round in replies:
            from veil.federated.privacy import attack_round

            rec["attack"] = attack_round(config, replies.pop(local_round), server_round)
            rec["attack_acc"] = rec["attack"]["attack_acc"]
            log(f"[federated] round {server_round}: attack on the engines' records {rec['attack_acc']:.4f} (primary-only floor {rec['attack']['primary_only_floor']:.4f})")
        rec.update(train_metrics.pop(local_round, {}))  # saved with the round, so a resumed run keeps them
        rec["elapsed_seconds"] = round(time.time() - t0, 2)
        history.append(rec)
        log(f"[federated] round {server_round}/{config.rounds}: " + "  ".join(f"{k} {v:.4f}" for k, v in accs.items()))
        save_weights(out / "checkpoint.safetensors", arrays.to_torch_state_dict())
        write_json(out / "rounds.json", {"rounds": history})  # last: the round counts once its weights are saved
        return MetricRecord(accs)

    remaining = config.rounds - max(done, 0)
    strategy = strategy or build_strategy(config)  # a caller may bring its own (lower minimums: veil.federated.deployment)
    replies: dict[int, list[tuple[int, dict]]] = {}  # round -> (node id, state) of each client's reply
    train_metrics: dict[int, dict[str, float]] = {}  # round -> the clients' aggregated training metrics
    aggregate = strategy.aggregate_train

    def keep_replies(local_round: int, msgs):  # what each client's engine worked with, for the attack
        msgs = list(msgs)
        if config.attack_epochs:
            replies[local_round] = [(m.metadata.src_node_id, m.content["arrays"].to_torch_state_dict()) for m in msgs if m.has_content()]
        arrays, metrics = aggregate(local_round, msgs)
        train_metrics[local_round] = {k: float(v) for k, v in (metrics or {}).items() if k != "num-examples"}
        return arrays, metrics

    strategy.aggregate_train = keep_replies  # type: ignore[method-assign]
    # Flower numbers the rounds of this start from 1; the clients seed a round's training by its number
    # in the whole run, so a resumed run trains round done + 1 as the uninterrupted run did
    train_config = ConfigRecord({"veil-config": config.to_json(), "round-offset": max(done, 0)})
    if remaining > 0:
        result = strategy.start(grid=grid, initial_arrays=ArrayRecord(state), num_rounds=remaining, train_config=train_config, evaluate_fn=evaluate_fn)
        final = result.arrays.to_torch_state_dict()
    else:
        final = load_weights(out / "checkpoint.safetensors")
    save_weights(out / "model.safetensors", unpack(final)[0])
    if aggregates_obfuscator(config):
        save_obfuscator(out / "obfuscator.safetensors", global_obfuscator(config, final))
    summary = {
        "config": config.to_dict(),
        "backend": backend,
        "exposure": "accuracy of the global model on each client's test shard, obfuscated by the global obfuscator (federated obfuscator training) or the client's own, with hard selection (acc_training_exposure) and without the label (acc_inference); acc_clean on the clean shards"
        + ("; attack: veil.evaluation attackers trained on held-out records obfuscated by each attacked client's obfuscator of the round, hard selection with y beside the message (what its engine received), scored on obfuscated test records" if config.attack_epochs else ""),
        "rounds": history,
        "seconds": round(time.time() - t0, 2),
    }
    plot_rounds(history, out / "accuracy_per_round.png", title=f"{config.task}: {config.clients} clients, {config.partition}, defense {config.obfuscator or config.defense}")
    write_json(out / "federated.json", summary)
    for name in ("rounds.json", "checkpoint.safetensors"):
        (out / name).unlink(missing_ok=True)
    return summary


def plot_rounds(history: list[dict[str, Any]], path: str | Path, *, title: str = "") -> None:
    """Per-round accuracy (both exposures and clean) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from veil.io import atomic_path

    fig, ax = plt.subplots(figsize=(6, 4))
    rounds = [h["round"] for h in history]
    for key, style in (("acc_training_exposure", "o-"), ("acc_inference", "s--"), ("acc_clean", "^:")):
        if all(key in h for h in history):
            ax.plot(rounds, [h[key] for h in history], style, label=key)
    ax.set(xlabel="round", ylabel="primary test accuracy", title=title, ylim=(0, 1))
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- the ServerApp for `flwr run`
def config_from_run_config(run_config: dict[str, Any]) -> tuple[FederatedConfig, str]:
    """A FederatedConfig and the output folder from Flower's run config (keys with dashes, e.g.
    ``local-epochs``; empty strings / 0 mean None for the optional ones; ``defense-options`` is JSON)."""
    import dataclasses
    import json

    rc = dict(run_config)
    out = str(rc.pop("out", "runs/federated"))
    kw: dict[str, Any] = {}
    fields = {f.name: f for f in dataclasses.fields(FederatedConfig)}
    for key, value in rc.items():
        name = key.replace("-", "_")
        if name not in fields:
            raise ValueError(f"unknown run-config key {key!r}; valid: out, {', '.join(sorted(k.replace('_', '-') for k in fields))}")
        if name == "defense_options":
            value = json.loads(value) if value else {}
        elif name in ("knob", "obfuscator", "train_size", "eval_size", "attack_size") and value in ("", 0):
            value = None
        kw[name] = value
    return FederatedConfig(**kw), out


def make_server_app(config: FederatedConfig | None = None, out: str | Path | None = None, *, backend: str = "") -> ServerApp:
    """A ServerApp running ``config`` into ``out``; without them it reads Flower's run config."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        cfg, folder = (config, out) if config is not None else config_from_run_config(context.run_config)
        run_server(grid, cfg, folder or "runs/federated", backend=backend or "deployment")

    return server


app = make_server_app()
