"""benchmarks/strong_report.py: standard against strong attacks, the goal columns computed, unfinished points named."""

import csv

import pytest

from tests.benchmarks.conftest import load_script
from veil.io import write_json

report = load_script("strong_report")


def _privacy(primary, attack, **extra):
    return {"defense": "select-salient", "knob_value": 0.35, "primary_acc": primary, "attack_acc": attack, "primary_only_floor": 0.10, **extra}


def test_table_compares_standard_and_strong(tmp_path, capsys):
    std_a, std_b, out = tmp_path / "a", tmp_path / "b", tmp_path / "strong"
    write_json(std_a / "privacy.json", _privacy(0.78, 0.12))
    write_json(std_b / "privacy.json", _privacy(0.90, 0.11))
    strong = _privacy(0.78, 0.13, secret_from_inversion_acc=0.19, inversion={"psnr": 21.5}, reconstruction={"psnr": 18.0},
                      fisher={"applicable": False})
    write_json(out / "point-a" / "privacy.json", strong)
    write_json(out / "point-b" / "privacy.json", _privacy(0.90, 0.125))  # point-c's strong evaluation has not finished
    report.main([str(out), f"point-a={std_a}", f"point-b={std_b}", f"point-c={std_b}", "--made-by", "a test"])
    a, b, c = list(csv.DictReader(open(out / "strong.csv")))
    assert a["strong_attack"] == "0.19" and a["strong_which"] == "secret_from_inversion_acc"  # the best of every attack
    assert a["rise"] == "0.07" and a["private_strong"] == "False" and a["rise_within_goal"] == "False"  # 0.19 > floor 0.10 + 0.05
    assert a["inversion_psnr"] == "21.5" and a["fisher_psnr_ceiling"] == ""
    assert b["rise"] == "0.015" and b["private_strong"] == "True" and b["rise_within_goal"] == "True"
    assert c["strong_which"] == "not finished" and c["strong_attack"] == ""
    text = (out / "README.md").read_text()
    assert "a test" in text and "| point-c |" in text and "**no**" in text


def test_refuses_a_point_without_a_standard_evaluation(tmp_path):
    with pytest.raises(SystemExit, match="NAME=STANDARD_RUN"):
        report.main([str(tmp_path / "out"), f"x={tmp_path}"])


def test_a_point_with_no_standard_evaluation_reports_the_strong_one_alone(tmp_path):
    out = tmp_path / "strong"
    write_json(out / "none" / "privacy.json", _privacy(0.79, 0.93, secret_from_inversion_acc=0.95, inversion={"psnr": 41.0}))
    report.main([str(out), "none=-", "later=-"])
    row, later = list(csv.DictReader(open(out / "strong.csv")))
    assert row["primary"] == "0.79" and row["strong_attack"] == "0.95" and row["inversion_psnr"] == "41.0"
    assert row["standard_attack"] == "" and row["rise"] == "" and row["private_strong"] == "False"
    assert later["strong_which"] == "not finished"
