"""``veil sweep --ray [ADDRESS]``: the sweep's runs as Ray tasks, on this machine or on a Ray cluster.

Each knob value is one Ray task (1 CPU) running :func:`veil.evaluation.sweep.sweep` for that value alone,
so a task writes exactly what the in-process sweep writes, into the same folder ``OUT/DEFENSE/knob=VALUE``:
every file atomically as soon as it exists, a finished run (its ``privacy.json`` made with the same
settings) skipped, an unfinished one resumed from its checkpoint. Without an address a local Ray instance
is started with ``num_cpus`` workers (default: all cores) and stopped afterwards; with one (``auto``, or
``HOST:6379`` of a running cluster) the tasks go to that cluster. Tasks pass only the sweep's arguments and
return the results (Ray's own serialisation between the driver and its workers; nothing is read from
anyone else). On a cluster, ``--out`` (and an ``npz:``/``idx:`` task's path) must name a folder every node
sees at the same path, such as a shared file system; paths are made absolute before the tasks start.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Iterable

from veil.defenses import defense_class
from veil.evaluation.sweep import EvalConfig, sweep
from veil.training.loop import TrainConfig


def _one_run(task: str, defense: str, knob: float | None, out: str, train: dict[str, Any], evaluation: EvalConfig) -> dict[str, Any]:
    """One knob value of the sweep (runs inside a Ray worker)."""
    return sweep(task, defense, [knob], out, train=train, evaluation=evaluation)[0]


def _absolute_task(task: str) -> str:
    for prefix in ("npz:", "idx:"):
        if task.startswith(prefix):
            return prefix + str(Path(task[len(prefix) :]).resolve())
    return task


def ray_sweep(
    task: str,
    defense: str,
    knobs: Iterable[float | None],
    out: str | Path,
    *,
    train: dict[str, Any] | None = None,
    evaluation: EvalConfig | None = None,
    address: str | None = None,
    num_cpus: int | None = None,
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """:func:`veil.evaluation.sweep.sweep` with every knob value a Ray task; results in ``knobs`` order.

    Args:
        address: A running Ray cluster (``auto`` or ``HOST:PORT``); ``None`` starts a local instance.
            Where this process has already initialised Ray, that instance is used and left running.
        num_cpus: Workers of the local instance (``None``: all cores); not allowed with ``address``.
    """
    import ray

    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    evaluation = evaluation or EvalConfig()
    train = dict(train or {})
    values = list(knobs)
    if not values:
        raise ValueError("knobs must hold at least one value")
    if not defense_class(defense).knob:
        values = [None]  # one run; two tasks must never train into the same folder
    for bad in ("task", "defense", "knob"):
        if bad in train:
            raise ValueError(f"train options must not set {bad!r}; pass it as an argument")
    for knob in values:  # every config is checked here, before a worker starts
        TrainConfig(task=task, defense=defense, knob=knob, **train)
    if address is not None and num_cpus is not None:
        raise ValueError("num_cpus applies to a local Ray instance only; a cluster's size is its own")
    if num_cpus is not None and num_cpus < 1:
        raise ValueError(f"num_cpus must be >= 1, got {num_cpus}")
    out, task = str(Path(out).resolve()), _absolute_task(task)

    started = not ray.is_initialized()
    if started:
        try:
            # one thread per task: on a few shared cores torch's own threads would only contend
            ray.init(address=address, num_cpus=num_cpus, include_dashboard=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
        except ConnectionError as err:
            raise ValueError(f"--ray {address}: cannot connect to a Ray cluster there ({err})") from err
    try:
        log(f"[sweep] {len(values)} run(s) as Ray tasks on {ray.cluster_resources().get('CPU', 0):g} CPU(s) -> {out}")
        remote = ray.remote(num_cpus=1)(_one_run)  # a task retried after a worker died resumes its run
        return ray.get([remote.remote(task, defense, knob, out, train, evaluation) for knob in values])
    finally:
        if started:
            ray.shutdown()


__all__ = ["ray_sweep"]
