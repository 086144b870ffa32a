"""Detection metrics from a maintained implementation: the COCO evaluation of ``faster-coco-eval``
(pycocotools' algorithm in C++), never a hand-written mAP.

torchmetrics' ``MeanAveragePrecision`` runs this same backend but needs torchvision for boxes, which veil
does not install; the COCO protocol (101-point interpolated precision, 100 detections per image, IoU
thresholds .5:.05:.95) is faster-coco-eval's own.
"""

from __future__ import annotations

import contextlib
import io
import logging

import torch


def mean_average_precision(preds: list[dict[str, torch.Tensor]], targets: list[dict[str, torch.Tensor]], num_classes: int | None = None) -> dict[str, float]:
    """COCO mAP@0.5 and mAP@[.5:.95] of box predictions against ground truth, one dict per image.

    Args:
        preds: ``[{boxes (K, 4) xyxy pixels, scores (K,), labels (K,)}]``.
        targets: ``[{boxes (M, 4) xyxy pixels, labels (M,)}]``.
        num_classes: Categories 0..num_classes-1 (default: every label seen).

    Returns:
        ``{"map_50", "map", "map_75", "mar_100"}`` as floats (COCO gives -1 where nothing can be scored).
    """
    from faster_coco_eval import COCO, COCOeval_faster

    if len(preds) != len(targets):
        raise ValueError(f"one prediction per image: got {len(preds)} predictions for {len(targets)} images")
    if num_classes is None:
        seen = [int(t["labels"].max()) for t in [*targets, *preds] if len(t["labels"])]
        num_classes = max(seen, default=0) + 1
    images, gts, dts = [], [], []
    for i, (p, t) in enumerate(zip(preds, targets)):
        images.append({"id": i + 1, "width": 1, "height": 1})
        for box, label in zip(t["boxes"].tolist(), t["labels"].tolist()):
            w, h = box[2] - box[0], box[3] - box[1]
            gts.append({"id": len(gts) + 1, "image_id": i + 1, "category_id": int(label) + 1, "bbox": [box[0], box[1], w, h], "area": w * h, "iscrowd": 0})
        for box, label, score in zip(p["boxes"].tolist(), p["labels"].tolist(), p["scores"].tolist()):
            dts.append({"image_id": i + 1, "category_id": int(label) + 1, "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]], "score": float(score)})
    if not gts:
        raise ValueError("no ground-truth boxes to score mAP against")
    gt = COCO()
    gt.dataset = {"images": images, "annotations": gts, "categories": [{"id": c + 1, "name": str(c)} for c in range(num_classes)]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        dt = gt.loadRes(dts) if dts else None
    if dt is None:
        return {"map_50": 0.0, "map": 0.0, "map_75": 0.0, "mar_100": 0.0}
    ev = COCOeval_faster(gt, dt, iouType="bbox", print_function=logging.getLogger(__name__).debug)
    with contextlib.redirect_stdout(io.StringIO()):
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    s = ev.stats  # AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ...
    return {"map": float(s[0]), "map_50": float(s[1]), "map_75": float(s[2]), "mar_100": float(s[8])}
