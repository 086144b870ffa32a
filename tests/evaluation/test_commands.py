"""evaluate / sweep / report write their files; an interrupted sweep resumes without redoing finished runs."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from veil.cli import app
from veil.evaluation import sweep as sweep_module
from veil.evaluation.report import report
from veil.evaluation.sweep import parse_knobs, run_dir

runner = CliRunner()


class Interrupted(Exception):
    """Stands for a kill in the middle of a sweep."""


def flat(text: str) -> str:
    return " ".join(text.split())  # rich wraps long error lines
TINY = ["--attack-epochs", "2", "--patience", "1", "--attackers", "linear,mlp", "--views", "1", "--averaging-k", "2",
        "--recon-epochs", "1", "--mi-samples", "100", "--mi-dims", "2"]


def invoke(args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def test_evaluate_writes_privacy_json(tmp_path):
    run = tmp_path / "run"
    invoke(["train", "--task", "digits-lt5", "--defense", "gaussian", "--lambda", "0.5", "--epochs", "1", "--train-size", "300", "--out", run])
    invoke(["evaluate", run, *TINY, "--attack-val-size", "50"])
    p = json.loads((run / "privacy.json").read_text())
    assert p["evaluation_config"]["attack"]["val_size"] == 50 and p["attack"]["inference"]["val_records"] == 50
    for key in ("primary_acc", "label_readback_training_exposure", "attack_acc", "attack_acc_training", "attack_acc_training_time",
                "majority_floor", "primary_only_floor", "averaging_attack_acc", "client_flops_share", "mi", "reconstruction",
                "evaluation_config", "attacker_records", "under_trained_exposures"):
        assert key in p, key
    assert set(p["attack"]["inference"]["attackers"]) == {"linear", "mlp"}
    # the attackers trained on the 300 records the defense did not train on, as many as it had
    assert p["attacker_records"]["train_records"] == 300 and p["attacker_records"]["disjoint_from_defense_training"] is True
    assert p["attack"]["training"]["attacker_gets_label"] is True and p["attack"]["training-time"]["same_as"] == "training"
    assert p["reconstruction"]["records"]["train_records"] == 300 and p["reconstruction"]["config"]["views"] == 1
    assert p["evaluation_config"]["attack"]["epochs"] == 2 and p["mi"]["config"]["samples"] == 100
    assert p["knob"] == "sigma" and p["knob_value"] == 0.5
    assert (run / "reconstruction.png").exists()


def test_sweep_resumes_after_interruption_and_report_draws_it(tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    args = ["sweep", "--task", "digits-lt5", "--defense", "gaussian", "--lambdas", "0,1", "--out", out, "--epochs", "1", "--train-size", "300", *TINY]
    real = sweep_module.evaluate_run
    calls = []

    def crash_on_second(run, *a, **k):
        calls.append(run)
        if len(calls) == 2:
            raise Interrupted("simulated interruption")
        return real(run, *a, **k)

    monkeypatch.setattr(sweep_module, "evaluate_run", crash_on_second)
    result = runner.invoke(app, [str(a) for a in args])
    assert isinstance(result.exception, Interrupted)
    first, second = run_dir(out, "gaussian", 0.0), run_dir(out, "gaussian", 1.0)
    assert (first / "privacy.json").exists() and not (second / "privacy.json").exists()
    assert (second / "metrics.json").exists()  # training of the second run had finished
    stamp = (first / "privacy.json").stat().st_mtime_ns

    calls.clear()
    monkeypatch.setattr(sweep_module, "evaluate_run", lambda run, *a, **k: (calls.append(run), real(run, *a, **k))[1])
    invoke(args)
    assert calls == [second]  # the finished run was skipped
    assert (first / "privacy.json").stat().st_mtime_ns == stamp
    assert (second / "privacy.json").exists()

    rep = tmp_path / "report"
    invoke(["report", out, "--out", rep])
    for name in ("results.csv", "results.md", "tradeoff_attack_digits-lt5.png", "tradeoff_mi_digits-lt5.png"):
        assert (rep / name).exists(), name
    csv = (rep / "results.csv").read_text().splitlines()
    assert len(csv) == 3 and csv[0].startswith("task,defense,knob,knob_value,primary_acc,attack_acc")
    assert "training_exposure" not in csv[0] and "primary (training" not in (rep / "results.md").read_text()
    assert "primary-only floor" in (rep / "results.md").read_text()


def test_defense_without_knob_makes_one_run(tmp_path):
    res = sweep_module.sweep("digits-lt5", "none", [0.0, 1.0], tmp_path, train={"epochs": 1, "train_size": 200},
                             evaluation=sweep_module.EvalConfig(
                                 attack=sweep_module.AttackConfig(attackers=("linear",), epochs=1, patience=1, views=1, averaging_k=0),
                                 reconstruction=None, mi=None),
                             log=lambda s: None)
    assert len(res) == 1 and (tmp_path / "none" / "knob=default" / "privacy.json").exists()
    assert res[0]["mi"] is None and res[0]["reconstruction"] is None


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(ValueError, match="'a'"):
        parse_knobs("0,a")
    with pytest.raises(ValueError, match="no knob values"):
        parse_knobs(" , ")
    with pytest.raises(ValueError, match="no privacy.json"):
        report([tmp_path], tmp_path / "r")
    with pytest.raises(ValueError, match="unknown defense 'nope'"):
        sweep_module.sweep("digits-lt5", "nope", [1.0], tmp_path)
    result = runner.invoke(app, ["evaluate", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "not a run folder" in flat(result.output)
    result = runner.invoke(app, ["evaluate", str(tmp_path), "--attackers", "resnet"])
    assert result.exit_code == 2 and "unknown attacker 'resnet'" in flat(result.output)
    result = runner.invoke(app, ["evaluate", str(tmp_path), "--attack-device", "tpu"])
    assert result.exit_code == 2 and "device must be" in flat(result.output)


def test_knob_lists_refuse_duplicates_and_non_finite_values():
    import pytest

    from veil.evaluation.sweep import parse_knobs

    assert parse_knobs("0, 0.5,default") == [0.0, 0.5, None]
    assert str(parse_knobs("-0")[0]) == "0.0"  # -0 names the same run folder as 0
    for text, words in (("0,-0", "twice"), ("1,1.0", "twice"), ("nan", "finite"), ("1,inf", "finite"), ("a", "numbers")):
        with pytest.raises(ValueError, match=words):
            parse_knobs(text)


@pytest.mark.parametrize("command", ["evaluate", "sweep"])
def test_evaluation_option_defaults_are_the_config_defaults(command):
    """The attack, reconstruction and MI options show the defaults written in their config dataclasses."""
    import dataclasses

    import typer

    from veil.cli import app
    from veil.evaluation.attack import AttackConfig
    from veil.evaluation.mutual_information import MIConfig
    from veil.evaluation.reconstruction import ReconstructionConfig

    fields = {
        "attack_epochs": (AttackConfig, "epochs"), "patience": (AttackConfig, "patience"), "attack_train_size": (AttackConfig, "train_size"),
        "attack_test_size": (AttackConfig, "test_size"), "attack_width": (AttackConfig, "width"), "attackers": (AttackConfig, "attackers"),
        "views": (AttackConfig, "views"), "averaging_k": (AttackConfig, "averaging_k"), "exposures": (AttackConfig, "exposures"),
        "eval_seed": (AttackConfig, "seed"), "attack_device": (AttackConfig, "device"), "recon_epochs": (ReconstructionConfig, "epochs"),
        "recon_width": (ReconstructionConfig, "width"), "mi_dims": (MIConfig, "dims"), "mi_k": (MIConfig, "k"), "mi_samples": (MIConfig, "samples"),
    }
    params = {p.name: p for p in typer.main.get_command(app).commands[command].params}
    for name, (cls, field) in fields.items():
        f = {f.name: f for f in dataclasses.fields(cls)}[field]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if isinstance(default, tuple):  # comma-separated on the command line
            default = ",".join(default)
        assert params[name].default == default, (command, name, params[name].default, default)


def test_evaluate_strong_writes_the_new_attacks_and_their_grid(tmp_path):
    run = tmp_path / "run"
    invoke(["train", "--task", "digits-lt5", "--defense", "gaussian", "--lambda", "0.3", "--epochs", "1", "--train-size", "300", "--out", run])
    invoke(["evaluate", run, *TINY, "--exposures", "inference", "--strength", "strong", "--prior-epochs", "1", "--inversion-records", "16",
            "--inversion-steps", "20", "--fisher-records", "2", "--reader-cache", tmp_path / "readers"])
    p = json.loads((run / "privacy.json").read_text())
    assert p["evaluation_config"]["strength"] == "strong" and p["evaluation_config"]["attack"]["width"] >= 64
    assert p["evaluation_config"]["reader_cache"] == str(tmp_path / "readers") and len(list((tmp_path / "readers").glob("secret-reader-*.safetensors"))) == 1
    assert p["reconstruction"]["secret"]["from_cache"] is False
    assert {"cnn", "cnn-bn", "server"} <= set(p["attack"]["inference"]["attackers"])  # every architecture, at the strong width
    assert p["inversion"]["path"] == "gaussian-likelihood" and p["inversion"]["test_records"] == 16
    assert p["reconstruction_prior"]["prior"]["transferred"] == "all"
    assert p["fisher"]["applicable"] and p["fisher"]["mse_bound"] == pytest.approx(0.09, rel=1e-4)
    for key in ("secret_from_reconstruction_acc", "secret_from_prior_reconstruction_acc", "secret_from_inversion_acc"):
        assert 0 <= p[key] <= 1, key
    accs = [p[k] for k in ("attack_acc", "averaging_attack_acc", "secret_from_reconstruction_acc", "secret_from_prior_reconstruction_acc", "secret_from_inversion_acc")]
    assert p["best_attack"] == max(accs) and p["best_attack_name"] in p
    assert (run / "attacks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the standard strength again: the strong parts and their grid go
    invoke(["evaluate", run, *TINY, "--exposures", "inference"])
    p = json.loads((run / "privacy.json").read_text())
    assert "inversion" not in p and "strength" not in p["evaluation_config"] and not (run / "attacks.png").exists()


def test_evaluate_refuses_an_unknown_strength_and_a_reader_cache_that_is_a_file(tmp_path):
    run = tmp_path / "run"
    invoke(["train", "--task", "digits-lt5", "--defense", "none", "--epochs", "1", "--train-size", "300", "--out", run])
    result = runner.invoke(app, ["evaluate", str(run), "--strength", "huge"])
    assert result.exit_code == 2 and "--strength must be standard or strong" in flat(result.output)
    (tmp_path / "file").write_text("x")
    result = runner.invoke(app, ["evaluate", str(run), "--strength", "strong", "--reader-cache", str(tmp_path / "file")])
    assert result.exit_code != 0 and "file" in flat(result.output) and not (run / "privacy.json").exists()
