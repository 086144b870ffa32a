"""The client budget: one number that sizes every defense's client network.

A defense with a client network names the constructor option that sets its size
(``Defense.budget_option``: ``selector_width`` for the SCNL family, ``hidden`` for ANI's f_psi,
``client_channels`` for SVD and sample-and-hold, ``channels`` for Shredder, ``width`` for ``local``).
:func:`fit_client_budget` picks the largest value of that option whose measured client FLOPs (``encode``,
inference path, :func:`veil.models.count_flops`) stay within ``budget`` times the server's FLOPs (the server
model run on the defense's message, ``decode`` included), so that every method is compared at the same
client cost. A budget no size can meet is refused with the smallest share reachable.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from veil.defenses import create_defense, defense_class
from veil.models import count_flops, create_model

#: Largest size tried for a client network's option.
MAX_SIZE = 256


def client_share(name: str, options: dict[str, Any], input_shape: tuple[int, ...], num_classes: int, model: str | nn.Module) -> float:
    """Measured client FLOPs of defense ``name`` with ``options`` as a share of the server model's FLOPs.

    ``model``: a model name (:func:`veil.models.create_model`) or the server model itself (a user's own,
    from :class:`veil.Obfuscation`), which must read the defense's decoded message.

    Measured on a defense initialised from a fixed seed, inside a forked random state: a method whose
    cost depends on its weights (scnl-detect's per-object regions) gives one answer for one size, and the
    caller's random stream is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        defense = create_defense(name, input_shape=input_shape, num_classes=num_classes, **options).eval()
        server = model if isinstance(model, nn.Module) else create_model(model, defense.output_shape(), num_classes)
        client = count_flops(defense.probe, defense.input_shape)
        with torch.no_grad():
            message_shape = tuple(defense.probe(torch.rand(1, *defense.input_shape)).shape[1:])
        return client / max(1, count_flops(lambda m: server(defense.decode(m)), message_shape))


def fit_client_budget(
    name: str, budget: float, options: dict[str, Any], *, input_shape: tuple[int, ...], num_classes: int, model: str | nn.Module
) -> tuple[dict[str, Any], float]:
    """``options`` with defense ``name``'s size option set to the largest value within ``budget``.

    Args:
        budget: Client FLOPs allowed, as a fraction of the server model's (e.g. 0.01 for 1%).
        options: The defense's other options (its size option, if given, is replaced).

    Returns:
        (options, measured share). Raises ``ValueError`` if no size fits, naming the smallest share.
    """
    if not (isinstance(budget, (int, float)) and math.isfinite(budget) and 0 < budget <= 1):
        raise ValueError(f"client budget must be a fraction in (0, 1], got {budget!r}")
    key = defense_class(name).budget_option
    if not key:  # no client network to size: the method's cost is what it is
        share = client_share(name, options, input_shape, num_classes, model)
        if share > budget:
            raise ValueError(f"defense {name!r} has no client network to shrink and takes {share:.2%} of the server's FLOPs, over the budget {budget:.2%}")
        return dict(options), share

    def share_at(size: int) -> float:
        return client_share(name, {**options, key: size}, input_shape, num_classes, model)

    smallest = share_at(1)
    if smallest > budget:
        raise ValueError(f"defense {name!r} cannot fit a client budget of {budget:.2%}: its smallest client network ({key}=1) takes {smallest:.2%} of the server's FLOPs")
    lo, hi = 1, 2  # lo fits; grow hi until it does not (or reaches MAX_SIZE), then bisect
    while hi <= MAX_SIZE and share_at(hi) <= budget:
        lo, hi = hi, hi * 2
    hi = min(hi, MAX_SIZE + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if share_at(mid) <= budget else (lo, mid)
    return {**options, key: lo}, share_at(lo)
