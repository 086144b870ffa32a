"""Deployment noise: drawn from OS entropy per call, not regenerable from any seed the receiver knows,
never shared between calls, and without side effects on the caller's random state."""

from __future__ import annotations

import pytest
import torch

from veil.defenses import create_defense
from veil.noise import draw_noise_seed, private_noise, seed_everything
from veil.training import obfuscate

torch.set_num_threads(1)
SIGMA = 0.5


def _gaussian():
    return create_defense("gaussian", input_shape=(1, 8, 8), num_classes=2, sigma=SIGMA)


def _records(n: int = 600) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def _replay(state: torch.Tensor, like: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """An adversary's redraw of gaussian's eps from a known generator state, batch by batch as
    ``obfuscate`` encodes (``x + sigma * randn_like(x)`` per batch)."""
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(state)
        return torch.cat([torch.randn_like(like[i : i + batch_size]) for i in range(0, len(like), batch_size)])


def test_private_noise_restores_the_callers_state_and_never_repeats():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    with private_noise():
        a = torch.randn(1000)
    assert torch.equal(torch.get_rng_state(), before)  # training/evaluation reproducibility untouched
    torch.manual_seed(0)
    with private_noise():
        b = torch.randn(1000)
    assert not torch.equal(a, b)  # same caller seed, different noise
    assert not torch.equal(a, torch.randn(1000, generator=torch.Generator().manual_seed(0)))


def test_research_generator_is_reproducible_and_advances():
    def draw(gen):
        with private_noise(gen):
            return torch.randn(100)

    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    first, again = draw(g1), draw(g2)
    assert torch.equal(first, again)
    assert not torch.equal(draw(g1), first)  # a second block from the same generator: a new stream
    assert len({draw_noise_seed() for _ in range(20)}) == 20
    with pytest.raises(ValueError, match="generator must be a torch.Generator"):
        draw_noise_seed(7)


def test_adversary_with_the_training_seed_cannot_remove_gaussian_noise():
    """The Python deployment path: the user trained with ``seed_everything(seed)`` and then calls
    ``obfuscate``. An adversary who knows that seed replays the generator exactly as the old code drew
    from it and subtracts sigma * eps. With private noise the residual error is the full noise."""
    x = _records()
    seed_everything(0)
    defense = _gaussian()
    known_state = torch.get_rng_state()  # reproducible by anyone holding the seed and the code
    m = obfuscate(defense, x)
    assert torch.equal(torch.get_rng_state(), known_state)  # obfuscation left the caller's stream alone
    x_hat = m - SIGMA * _replay(known_state, x)
    err = (x_hat - x).abs().mean().item()
    # E|sigma (eps - eps')| = sigma * 2/sqrt(pi) ~ 0.56 for independent eps; a regenerated one gives ~0
    assert err > 0.4, err
    # and the message really is x plus noise of scale sigma (the test would pass vacuously otherwise)
    assert (m - x).std().item() == pytest.approx(SIGMA, rel=0.05)


def test_two_calls_never_share_a_noise_stream():
    x = _records(200)
    defense = _gaussian()
    torch.manual_seed(0)
    a = obfuscate(defense, x) - x
    torch.manual_seed(0)
    b = obfuscate(defense, x) - x
    # independent streams: not equal, not shifted copies, uncorrelated
    assert not torch.equal(a, b)
    assert abs(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()) < 0.05
    assert not torch.isin(a.flatten()[:50], b.flatten()).any()


def test_research_generator_makes_obfuscate_repeatable():
    x = _records(100)
    defense = _gaussian()
    a = obfuscate(defense, x, generator=torch.Generator().manual_seed(3))
    b = obfuscate(defense, x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="same length"):
        obfuscate(defense, x, torch.zeros(5, dtype=torch.long))


def _mt_words() -> list[int]:
    """The 624 Mersenne Twister words of PyTorch's CPU generator (legacy state layout)."""
    import numpy as np

    return torch.get_rng_state().numpy()[24 : 24 + 8 * 624].view(np.uint64).astype(int).tolist()


def _from_a_32_bit_seed(words: list[int]) -> bool:
    """True if ``words`` is the state ``manual_seed`` gives: mt19937's init recurrence from word 0."""
    return all(words[j] == (1812433253 * (words[j - 1] ^ (words[j - 1] >> 30)) + j) & 0xFFFFFFFF for j in range(1, 624))


def test_cpu_stream_is_not_one_of_the_2_to_32_that_manual_seed_allows():
    torch.manual_seed(2**40 + 5)
    assert _from_a_32_bit_seed(_mt_words())  # the oracle recognises any seeded state
    with private_noise():
        assert not _from_a_32_bit_seed(_mt_words())
        eps = torch.randn(20000)
    assert abs(eps.mean().item()) < 0.05 and eps.std().item() == pytest.approx(1.0, abs=0.05)


def test_adversary_searching_the_seed_space_torch_keeps_finds_nothing(monkeypatch):
    """torch's CPU generator drops all but the low 32 bits of a seed, so a 63-bit OS seed still leaves
    only 2**32 streams: a receiver who knows some noise values (blank background) can try them all. Here
    the search is shrunk to 1024 candidates by fixing the OS seed's low bits in that range; the
    adversary matches the first noise values of a record and must find nothing."""
    import veil.noise

    monkeypatch.setattr(veil.noise.secrets, "randbits", lambda bits: (123456789 << 32) + 737)
    with private_noise():
        observed = torch.randn(1, 1, 8, 8)  # as gaussian draws it for one record (sigma * eps on a blank)
    hits = []
    for candidate in range(1024):
        torch.manual_seed(candidate)
        if torch.allclose(torch.randn(1, 1, 8, 8)[0, 0, 0], observed[0, 0, 0]):
            hits.append(candidate)
    assert hits == []
