"""Reconstruction attack: high PSNR in the clear, no better than the mean image against destroyed input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from veil.defenses import create_defense
from veil.evaluation.reconstruction import ReconstructionConfig, build_decoder, image_scores, reconstruction_attack

FAST = ReconstructionConfig(epochs=8, patience=3, width=32)


def test_clear_records_reconstruct_well_and_grid_is_written(digits, tmp_path):
    d = create_defense("none", input_shape=digits.input_shape, num_classes=2)
    r = reconstruction_attack(d, digits, FAST, grid_path=tmp_path / "grid.png", log=lambda s: None)
    assert r["psnr"] > 20 and r["ssim"] > 0.8
    assert r["psnr"] > r["baseline_psnr"] + 8
    assert r["records"]["disjoint_from_defense_training"] is True and r["records"]["train_records"] == len(digits.train)
    png = (tmp_path / "grid.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_destroyed_records_do_not_reconstruct(digits, make, fakes):
    d = make(fakes["pure-noise"], digits)
    r = reconstruction_attack(d, digits, FAST, log=lambda s: None)
    assert r["psnr"] < r["baseline_psnr"] + 1.0 < 14
    assert r["ssim"] < r["baseline_ssim"] + 0.05


def test_vector_messages_are_decoded(digits, make, fakes):
    dec = build_decoder((64,), (1, 8, 8), width=8)
    dec.eval()
    assert dec(torch.rand(2, 64)).shape == (2, 1, 8, 8)
    r = reconstruction_attack(make(fakes["flatten"], digits), digits, ReconstructionConfig(epochs=3, width=16), log=lambda s: None)
    assert r["psnr"] > r["baseline_psnr"]


def test_decoder_trains_on_fresh_obfuscations_per_view(digits, monkeypatch):
    """Like the classifiers, the decoder sees ``views`` independent obfuscations of its training records."""
    from veil.evaluation import reconstruction as module

    drawn = []
    real = module._messages
    monkeypatch.setattr(module, "_messages", lambda d, split, exposure, k=1: drawn.append(real(d, split, exposure, k)) or drawn[-1])
    d = create_defense("gaussian", input_shape=digits.input_shape, num_classes=2, sigma=1.0)
    r = reconstruction_attack(d, digits, ReconstructionConfig(epochs=3, width=8, views=3), log=lambda s: None)
    train_draws = [m for m in drawn if len(m) == r["records"]["train_records"]]
    assert len(train_draws) == 3 and not torch.equal(train_draws[0], train_draws[1])
    assert r["config"]["views"] == 3


@pytest.mark.filterwarnings("ignore:divide by zero")  # scikit-image on identical images (PSNR = inf, capped)
def test_image_scores_against_identical_and_noisy_images():
    rng = np.random.default_rng(0)
    a = rng.random((4, 1, 8, 8))
    psnr, ssim = image_scores(a, a, 1.0)
    assert psnr == 100.0 and ssim == pytest.approx(1.0)
    psnr2, ssim2 = image_scores(a, np.clip(a + 0.1 * rng.normal(size=a.shape), 0, 1), 1.0)
    assert 15 < psnr2 < 25 and ssim2 < 1.0


@pytest.mark.parametrize("kwargs, match", [(dict(epochs=0), "epochs must be >= 1"), (dict(exposure="serve"), "unknown exposure"), (dict(lr=0.0), "lr must be"), (dict(views=0), "views must be >= 1")])
def test_bad_config_is_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ReconstructionConfig(**kwargs)


def test_decoder_with_a_prior_is_pretrained_on_clean_records(digits, make, fakes):
    d = create_defense("gaussian", input_shape=digits.input_shape, num_classes=2, sigma=0.3)
    r = reconstruction_attack(d, digits, ReconstructionConfig(epochs=3, width=16, prior_epochs=2), log=lambda s: None)
    assert r["prior"]["transferred"] == "all" and r["prior"]["epochs_run"] == 2 and r["config"]["prior_epochs"] == 2
    assert r["psnr"] > r["baseline_psnr"]
    r = reconstruction_attack(make(fakes["flatten"], digits), digits, ReconstructionConfig(epochs=2, width=16, prior_epochs=1), log=lambda s: None)
    assert r["prior"]["transferred"] == "refinement"  # a vector message: only the refinement stage is shared
    assert "prior_epochs" not in ReconstructionConfig().to_dict()  # standard configs read as before
