"""Flower ClientApp: each client obfuscates its own records, then its local engine trains on them.

In ``federated`` obfuscator training the message's arrays hold the global model and the global
obfuscator (:func:`~veil.federated.task.pack`): the client first trains the obfuscator on its trusted
fraction (trusted side), then obfuscates every record with it and hands them to its engine, and sends
back both.

The run's :class:`~veil.federated.task.FederatedConfig` arrives as JSON in the message's config record
(key ``veil-config``), so the same app works in the in-process grid, the Ray simulation and real
``flower-supernode`` processes. The client's partition comes from ``context.node_config["partition-id"]``.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from veil.defenses import Defense
from veil.federated.task import (
    FederatedConfig, aggregates_obfuscator, client_data, client_obfuscator, evaluate_model, global_obfuscator, local_train, new_model,
    obfuscate_for_engine, pack, train_obfuscator, trusted_records, unpack,
)

app = ClientApp()

# (config JSON, partition id) -> obfuscator. Trained once per client process; the training is seeded,
# so a client restarted elsewhere rebuilds the same obfuscator.
_OBFUSCATORS: dict[tuple[str, int], Defense] = {}


def _setup(msg: Message, context: Context) -> tuple[FederatedConfig, int, str]:
    record = msg.content["config"]
    asked = [k for k in record.keys() if "noise" in k.lower()]
    if asked:
        # the server must never choose (or learn) the seed of the noise that hides the records from it
        raise ValueError(f"refusing the server's noise setting(s) {asked}: federated clients draw their obfuscation noise from the operating system's entropy only")
    text = str(record["veil-config"])
    config = FederatedConfig.from_json(text)
    pid = int(context.node_config.get("partition-id", -1))
    if pid < 0:
        raise ValueError("this node has no 'partition-id' in its node config; start it with --node-config 'partition-id=K num-partitions=N'")
    return config, pid, text


def _obfuscator(config: FederatedConfig, pid: int, text: str, train) -> Defense:
    key = (text, pid)
    if key not in _OBFUSCATORS:
        _OBFUSCATORS[key] = client_obfuscator(config, pid, train)
    return _OBFUSCATORS[key]


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One local round: trusted obfuscation of every record, then untrusted local training."""
    config, pid, text = _setup(msg, context)
    # the round in the whole run (a resumed server restarts its own count; it sends the offset)
    server_round = int(msg.content["config"].get("server-round", 0)) + int(msg.content["config"].get("round-offset", 0))
    state = msg.content["arrays"].to_torch_state_dict()
    model = new_model(config)
    model_state, _ = unpack(state)
    model.load_state_dict(model_state)
    train_split, _ = client_data(config, pid)
    if aggregates_obfuscator(config):
        # trusted side: the global obfuscator trained on this round's trusted fraction jointly with the
        # global model, which the engine then trains further (the model sees only messages in both)
        defense = global_obfuscator(config, state)
        trusted = trusted_records(config, pid, train_split, draw=server_round)
        train_obfuscator(defense, model, trusted, config, seed=config.seed + 7 * server_round + pid)
    else:
        defense = _obfuscator(config, pid, text, train_split)
    # trusted side: hard selection by the known label, fresh OS-entropy noise every call (nothing the
    # server knows, such as config.seed, the round or pid, seeds it)
    x_obf = obfuscate_for_engine(defense, train_split)
    y = train_split.y
    del train_split  # nothing clean goes past this line
    # untrusted compute engine
    mu = float(msg.content["config"].get("proximal-mu", 0.0))
    history = local_train(model, x_obf, y, config, seed=config.seed + 7 * server_round + pid, proximal_mu=mu)
    metrics = MetricRecord({"train_loss": history[-1]["loss"], "train_acc": history[-1]["train_acc"], "num-examples": len(y)})
    arrays = ArrayRecord(pack(model, defense if aggregates_obfuscator(config) else None))
    return Message(content=RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on this client's test shard, obfuscated by the global obfuscator
    (``federated`` training) or its own.

    ``acc_clean`` (the model on the clean shard) is a reference number for the data owner: it is
    computed on the trusted side, like the obfuscation itself, never by the local training engine.
    """
    config, pid, text = _setup(msg, context)
    train_split, test = client_data(config, pid)
    state = msg.content["arrays"].to_torch_state_dict()
    defense = global_obfuscator(config, state) if aggregates_obfuscator(config) else _obfuscator(config, pid, text, train_split)
    model = new_model(config)
    model.load_state_dict(unpack(state)[0])
    accs = evaluate_model(model, defense, test)
    metrics = MetricRecord({**accs, "num-examples": len(test)})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
