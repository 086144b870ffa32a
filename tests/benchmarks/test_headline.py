"""benchmarks/headline.py end to end at smoke-test sizes on digits-lt5: runs, table, plots, README, resume."""

from __future__ import annotations

import json

import pytest

from .conftest import load_script


@pytest.fixture(scope="module")
def headline():
    return load_script("headline")


def test_headline_writes_table_plots_readme_and_resumes(headline, tmp_path):
    args = ["--tiny", "--tasks", "digits-lt5", "--defenses", "none,gaussian", "--knobs", "gaussian=0.3,3", "--out", str(tmp_path)]
    assert headline.main(args) == 0
    rows = (tmp_path / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 3  # header, none, gaussian at two knobs
    summary = json.loads((tmp_path / "headline.json").read_text())
    assert summary["failures"] == [] and len(summary["runs"]) == 3
    readme = (tmp_path / "README.md").read_text()
    assert "--defenses none,gaussian" in readme and "time spent in the runs" in readme
    assert list(tmp_path.glob("tradeoff_attack_*.png"))
    gaussian = {float(r.split(",")[3]): r for r in rows[1:] if ",gaussian," in r}
    assert set(gaussian) == {0.3, 3.0}
    # the attackers are at least the engine: its model among them, as many records as the defense had, none shared
    p = json.loads(next(tmp_path.rglob("privacy.json")).read_text())
    assert "server" in p["attack"]["inference"]["attackers"] and p["attack"]["config"]["width"] >= 32
    assert p["attacker_records"]["train_records"] == 400 and p["attacker_records"]["disjoint_from_defense_training"] is True
    # rerun: every run is found finished and skipped (no training line logged)
    lines = []
    headline.log = lines.append
    assert headline.main(args) == 0
    assert not any(line.startswith("[none]") or line.startswith("[gaussian]") for line in lines)
    assert sum("already evaluated" in line for line in lines) == 3


def test_attack_settings_are_at_least_the_engine(headline):
    """Both presets: CNN attackers as wide as the server's cnn (32), as many attacker records as the defense had."""
    for preset in (headline.FULL, headline.TINY):
        assert preset["attack"]["width"] >= 32 and preset["recon"]["width"] >= 32
        assert preset["attack"]["train_size"] is None or preset["attack"]["train_size"] >= preset["train_size"]
        assert preset["recon"]["train_size"] is None or preset["recon"]["train_size"] >= preset["train_size"]
        assert "attackers" not in preset["attack"]  # the default set, the server's own model included


def test_headline_rejects_unknown_defense(headline, tmp_path):
    with pytest.raises(ValueError, match="unknown"):
        headline.main(["--tiny", "--tasks", "digits-lt5", "--defenses", "nonsense", "--out", str(tmp_path)])
