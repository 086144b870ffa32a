import json

import numpy as np
from typer.testing import CliRunner

from veil.cli import app


def test_train_evaluate_export(small_task, tmp_path):
    """veil train / evaluate / export with the detection defense on 15 scenes handed over in COCO format."""
    from veil.detection.coco import write_coco

    write_coco(small_task.test, tmp_path / "img", tmp_path / "ann.json")
    runner = CliRunner()
    run = tmp_path / "run"
    res = runner.invoke(app, ["train", "--task", f"coco:{tmp_path / 'img'},{tmp_path / 'ann.json'}", "--model", "detector", "--defense", "scnl-detect",
                              "--lambda", "0.5", "-e", "1", "--batch-size", "4", "--client-budget", "0.01", "-o", str(run)])
    assert res.exit_code == 0, res.output
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0 <= metrics["inference"]["map_50"] <= 1 and metrics["client_flops_share"] <= 0.01
    res = runner.invoke(app, ["evaluate", str(run), "--attack-epochs", "1", "--attackers", "cnn", "--views", "1", "--averaging-k", "2",
                              "--recon-epochs", "1"])
    assert res.exit_code == 0, res.output
    privacy = json.loads((run / "privacy.json").read_text())
    assert {"attack_inference", "attack_training", "attack_averaging", "floor", "psnr"} <= set(privacy["summary"])
    assert (run / "detection.png").stat().st_size > 1000
    out = tmp_path / "m.npz"
    res = runner.invoke(app, ["export", str(run), "-o", str(out)])
    assert res.exit_code == 0, res.output
    with np.load(out, allow_pickle=False) as f:
        assert f["x"].shape[1:] == (1, 64, 64) and "y" not in f and json.loads(str(f["metadata"]))["noise"] == "os-entropy"


def test_bad_detection_input_gives_one_line(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["train", "--task", f"coco:{tmp_path},{tmp_path / 'missing.json'}", "--model", "detector", "-o", str(tmp_path / "r")])
    assert res.exit_code == 2 and "no such annotation file" in res.output and len(res.output.strip().splitlines()) == 1
