import pytest
import torch

from veil.detection.metrics import mean_average_precision


def _scene_targets(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(1, 5, (1,), generator=g))
        xy = torch.rand(k, 2, generator=g) * 40
        wh = 8 + torch.rand(k, 2, generator=g) * 16
        out.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.randint(0, 2, (k,), generator=g)})
    return out


def test_ground_truth_as_predictions_scores_one():
    t = _scene_targets()
    p = [{**x, "scores": torch.ones(len(x["labels"]))} for x in t]
    m = mean_average_precision(p, t, 2)
    assert m["map_50"] == pytest.approx(1.0) and m["map"] == pytest.approx(1.0)


def test_shifted_boxes_score_lower():
    t = _scene_targets()
    for shift, most in ((3.0, 0.99), (12.0, 0.2)):
        p = [{"boxes": x["boxes"] + shift, "labels": x["labels"], "scores": torch.ones(len(x["labels"]))} for x in t]
        m = mean_average_precision(p, t, 2)
        assert m["map"] < most
    assert m["map_50"] < 0.2


def test_matches_pycocotools():
    """The same numbers from the reference COCO API, on noisy predictions with scores."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    t = _scene_targets(20, seed=1)
    g = torch.Generator().manual_seed(2)
    p = [{"boxes": x["boxes"] + torch.randn(x["boxes"].shape, generator=g) * 2, "labels": x["labels"], "scores": torch.rand(len(x["labels"]), generator=g)} for x in t]
    ours = mean_average_precision(p, t, 2)
    images = [{"id": i + 1, "width": 64, "height": 64} for i in range(len(t))]
    anns = [{"id": len(images) * 10 + j, "image_id": i + 1, "category_id": int(l) + 1, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "area": float((b[2] - b[0]) * (b[3] - b[1])), "iscrowd": 0}
            for i, x in enumerate(t) for j, (b, l) in enumerate(zip(x["boxes"].tolist(), x["labels"].tolist()))]
    for k, a in enumerate(anns):
        a["id"] = k + 1
    dts = [{"image_id": i + 1, "category_id": int(l) + 1, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": float(s)}
           for i, x in enumerate(p) for b, l, s in zip(x["boxes"].tolist(), x["labels"].tolist(), x["scores"].tolist())]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": 1}, {"id": 2}]}
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(dts), "bbox")
        ev.evaluate(), ev.accumulate(), ev.summarize()
    assert ours["map"] == pytest.approx(ev.stats[0], abs=1e-6) and ours["map_50"] == pytest.approx(ev.stats[1], abs=1e-6)


def test_mismatched_lists_are_named():
    with pytest.raises(ValueError, match="one prediction per image"):
        mean_average_precision([], _scene_targets(2))
