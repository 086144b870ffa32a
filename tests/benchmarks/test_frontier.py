"""benchmarks/frontier.py: the run plan (most telling runs first, region defenses only on masked tasks), the
gap-closed summary computed from its definition, and a smoke run on digits-lt5 that writes the table, the plot
and resumes."""

from __future__ import annotations

import pytest

from .conftest import load_script


@pytest.fixture(scope="module")
def frontier():
    return load_script("frontier")


def test_plan_puts_the_one_percent_core_first_and_skips_region_defenses_without_masks(frontier):
    runs = frontier.plan(frontier.parse_args(["--tasks", "digits-lt5,digits-tag", "--budgets", "0.03,0.01", "--defenses", "none,local,scnl-region,ani"]))
    assert runs[:2] == [("digits-lt5", None, "none", None), ("digits-tag", None, "none", None)]
    assert [r[1] for r in runs[2:]] == sorted((r[1] for r in runs[2:]), key=lambda b: b != 0.01)  # 1% before 3%
    assert not any(r[0] == "digits-lt5" and r[2] == "scnl-region" for r in runs)
    assert any(r[0] == "digits-tag" and r[2] == "scnl-region" for r in runs)


def test_summary_picks_veils_best_hidden_defense_and_the_gap_it_closes(frontier):
    def row(defense, knob, primary, attack, budget=0.01):
        return {"task": "t", "budget": None if defense == "none" else budget, "defense": defense, "knob_value": knob,
                "primary_acc": primary, "best_attack": attack, "primary_only_floor": 0.2, "client_flops_share": 0.009}

    rows = [
        row("none", None, 0.99, 0.98),
        row("local", None, 0.95, 0.21),
        row("scnl", 1.0, 0.98, 0.60),  # best primary, but leaks: not counted
        row("scnl-private", 10.0, 0.97, 0.24),  # within floor + 0.05
        row("ani", 3e-5, 0.985, 0.23),  # a peer within the margin: reported apart from veil
    ]
    (s,) = frontier.summarise(rows)
    assert s["veil_best"] == "scnl-private 10" and s["peer_best"] == "ani 3e-05"
    assert s["gap_closed"] == pytest.approx((0.97 - 0.95) / (0.99 - 0.95))
    assert frontier.best_attack({"attack_acc": 0.3, "attack_acc_training": 0.5, "attack_acc_training_time": None, "averaging_attack_acc": 0.4}) == 0.5


def test_gap_is_closed_over_the_best_baseline_and_mask_users_are_kept_apart(frontier):
    def row(defense, primary, attack, budget=0.01, knob=None):
        return {"task": "t", "budget": None if defense == "none" else budget, "defense": defense, "knob_value": knob,
                "primary_acc": primary, "best_attack": attack, "primary_only_floor": 0.1, "client_flops_share": 0.009}

    rows = [
        row("none", 0.80, 0.93),
        row("local", 0.50, 0.10), row("local[arch=dsconv]", 0.70, 0.11),  # the best local is the best variant
        row("redact[box=14]", 0.75, 0.12), row("redact", 0.79, 0.40),  # a redaction that leaks is no baseline
        row("redact-oracle", 0.81, 0.10),  # the bound: neither baseline nor peer
        row("scnl-region[box=14]", 0.78, 0.12, knob=0.1),  # uses masks: judged against redaction
        row("scnl", 0.72, 0.13, knob=10.0),  # y alone: judged against local
        row("select-salient-z", 0.76, 0.12, knob=0.4),  # y and known secrets: not 'from y alone'
    ]
    (s,) = frontier.summarise(rows)
    assert s["local_best"] == "local[arch=dsconv]" and s["redact_best"] == "redact[box=14]" and s["baseline"] == "redact[box=14]"
    assert s["veil_best"] == "scnl-region[box=14] 0.1" and s["veil_uses"] == "y,mask"  # (the best of every veil row)
    assert s["gap_closed"] == pytest.approx((0.78 - 0.75) / (0.80 - 0.75))
    assert s["veil_y_best"] == "scnl 10" and s["gap_closed_y"] == pytest.approx((0.72 - 0.70) / (0.80 - 0.70))
    assert s["peer_best"] is None and s["oracle_primary"] == 0.81


def test_frontier_smoke_run_writes_table_plot_and_resumes(frontier, tmp_path):
    args = ["--tiny", "--tasks", "digits-lt5", "--budgets", "0.03", "--defenses", "none,local", "--attackers", "linear", "--no-extras", "--out", str(tmp_path)]
    assert frontier.main(args) == 0
    assert (tmp_path / "frontier.png").stat().st_size > 0
    lines = (tmp_path / "frontier.csv").read_text().splitlines()
    assert len(lines) == 1 + 2 and "local" in lines[2]
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("privacy.json")}
    assert frontier.main(args) == 0  # finished runs are skipped
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("privacy.json")} == before


def test_defense_options_keep_their_runs_apart_and_are_labelled(frontier, tmp_path):
    assert frontier.parse_defense_options(["scnl-region:box=14", "scnl-region:dilate=1", "ani:name=x"]) == {"scnl-region": {"box": 14, "dilate": 1}, "ani": {"name": "x"}}
    for bad in ("box=14", "scnl-region:box", "no-such-defense:box=1"):
        with pytest.raises(ValueError):
            frontier.parse_defense_options([bad])
    assert frontier.group_dir(tmp_path, "t", 0.01, {"box": 14}) == tmp_path / "runs" / "t" / "budget=0.01" / "options=box=14"
    assert frontier.group_dir(tmp_path, "t", 0.01, {}) == tmp_path / "runs" / "t" / "budget=0.01"
    # a variant of a veil defense counts as veil's, under its own label
    rows = [{"task": "t", "budget": b, "defense": d, "knob_value": k, "primary_acc": p, "best_attack": a, "primary_only_floor": 0.1, "client_flops_share": 0.01}
            for b, d, k, p, a in [(None, "none", None, 0.8, 0.9), (0.01, "local", None, 0.5, 0.1), (0.01, "scnl-region[box=14]", 0.1, 0.78, 0.12)]]
    (s,) = frontier.summarise(rows)
    assert s["veil_best"] == "scnl-region[box=14] 0.1" and s["gap_closed"] == pytest.approx(0.28 / 0.3)
