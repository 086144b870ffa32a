"""A small one-stage, anchor-free detector (CenterNet, Zhou et al. 2019, "Objects as Points").

The server model of the detection task (``--model detector``) and, made tiny, the on-device baseline.
A backbone at stride 4 feeds three heads: a per-class centre heatmap, the box size (log pixels) and the
centre's sub-cell offset. Training targets are Gaussian peaks at the box centres (penalty-reduced focal
loss, Eq. 1 of the paper) with L1 losses on size and offset at the centres; decoding keeps the 3x3 local
maxima of the heatmap (the paper's max-pool NMS) and their top ``max_detections``.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

STRIDE = 4


def _block(c_in: int, c_out: int, stride: int = 1, dilation: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=dilation, dilation=dilation, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


class CenterNet(nn.Module):
    """(B, C_in, H, W) -> dict of heatmap logits (B, K, H/4, W/4), size (B, 2, .) and offset (B, 2, .).

    Args:
        in_channels: Channels of the input (the decoded message).
        num_classes: K primary classes.
        width: Channels of the first block (doubling twice); 16 gives about 70 MFLOPs on 64x64.
        tiny: The on-device variant: two strided convolutions and one dilated one of ``width`` channels,
            1x1 heads (its FLOPs are what ``--client-budget`` sizes).
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 16, *, tiny: bool = False) -> None:
        super().__init__()
        if not (isinstance(width, int) and 1 <= width <= 512):
            raise ValueError(f"width must be an integer in [1, 512], got {width!r}")
        self.num_classes = int(num_classes)
        if tiny:
            c = width
            self.backbone = nn.Sequential(
                nn.BatchNorm2d(in_channels, affine=False),
                nn.Conv2d(in_channels, c, 3, stride=2, padding=1), nn.ReLU(),
                nn.Conv2d(c, c, 3, stride=2, padding=1), nn.ReLU(),
                nn.Conv2d(c, c, 3, padding=2, dilation=2), nn.ReLU(),
            )
            head = lambda k: nn.Conv2d(c, k, 1)  # noqa: E731
        else:
            c = 4 * width
            self.backbone = nn.Sequential(
                nn.BatchNorm2d(in_channels, affine=False),  # messages come at any scale
                *_block(in_channels, width), *_block(width, 2 * width, 2), *_block(2 * width, c, 2),
                *_block(c, c, dilation=2), *_block(c, c, dilation=4),
            )
            head = lambda k: nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, k, 1))  # noqa: E731
        self.heat, self.size, self.offset = head(self.num_classes), head(2), head(2)
        last = self.heat[-1] if isinstance(self.heat, nn.Sequential) else self.heat
        nn.init.constant_(last.bias, -math.log((1 - 0.01) / 0.01))  # prior 0.01 (focal-loss initialisation)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.backbone(x)  # (B, c, H/4, W/4)
        return {"heat": self.heat(f), "size": self.size(f), "offset": self.offset(f)}


def create_detector(name: str, input_shape: tuple[int, ...], num_classes: int, width: int | None = None) -> CenterNet:
    """``detector`` (the server model) or ``tiny`` (the on-device baseline) for inputs of ``input_shape``."""
    if name not in DETECTORS:
        raise ValueError(f"unknown detection model {name!r}; valid: {', '.join(DETECTORS)}")
    if len(input_shape) != 3 or min(input_shape[1:]) < 16:
        raise ValueError(f"detection models need images (C, H, W) of at least 16x16, got {tuple(input_shape)}")
    tiny = name == "tiny"
    return CenterNet(int(input_shape[0]), num_classes, width or (4 if tiny else 16), tiny=tiny)


DETECTORS = ("detector", "tiny")


def encode_targets(boxes: list[torch.Tensor], labels: list[torch.Tensor], num_classes: int, out_hw: tuple[int, int]) -> dict[str, torch.Tensor]:
    """CenterNet training targets for a batch: heatmap (B, K, h, w) with a Gaussian peak per object, and
    per object its cell index, size (log w, log h) and offset, with the batch index."""
    h, w = out_hw
    b = len(boxes)
    heat = torch.zeros(b, num_classes, h, w)
    ys, xs = torch.arange(h, dtype=torch.float32)[:, None], torch.arange(w, dtype=torch.float32)[None, :]
    index, size, offset, batch = [], [], [], []
    for i, (bx, lb) in enumerate(zip(boxes, labels)):
        for box, c in zip(bx.tolist(), lb.tolist()):
            cx, cy = (box[0] + box[2]) / 2 / STRIDE, (box[1] + box[3]) / 2 / STRIDE
            bw, bh = max(box[2] - box[0], 1.0), max(box[3] - box[1], 1.0)
            ix, iy = min(int(cx), w - 1), min(int(cy), h - 1)
            # the paper's radius rule made simple: a Gaussian whose sigma grows with the object's size
            sigma = max(0.5, math.sqrt(bw * bh) / STRIDE / 6)
            g = torch.exp(-((xs - ix) ** 2 + (ys - iy) ** 2) / (2 * sigma**2))
            heat[i, c] = torch.maximum(heat[i, c], g)
            index.append(iy * w + ix)
            size.append([math.log(bw), math.log(bh)])
            offset.append([cx - ix, cy - iy])
            batch.append(i)
    return {
        "heat": heat, "index": torch.tensor(index, dtype=torch.long), "batch": torch.tensor(batch, dtype=torch.long),
        "size": torch.tensor(size, dtype=torch.float32).reshape(-1, 2), "offset": torch.tensor(offset, dtype=torch.float32).reshape(-1, 2),
    }


def detection_loss(out: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
    """Penalty-reduced focal loss on the heatmap (alpha 2, beta 4) + L1 on size and offset at the centres."""
    pred = torch.sigmoid(out["heat"]).clamp(1e-4, 1 - 1e-4)
    gt = targets["heat"].to(pred.device)
    pos = gt.eq(1).float()
    pos_loss = torch.log(pred) * (1 - pred) ** 2 * pos
    neg_loss = torch.log(1 - pred) * pred**2 * (1 - gt) ** 4 * (1 - pos)
    n = pos.sum().clamp(min=1)
    loss = -(pos_loss.sum() + neg_loss.sum()) / n
    if len(targets["index"]):
        bi, idx = targets["batch"], targets["index"]
        size = out["size"].flatten(2)[bi, :, idx]  # (M, 2)
        offset = out["offset"].flatten(2)[bi, :, idx]
        loss = loss + F.l1_loss(size, targets["size"].to(size.device)) + F.l1_loss(offset, targets["offset"].to(size.device))
    return loss


@torch.no_grad()
def decode(out: dict[str, torch.Tensor], max_detections: int = 20) -> list[dict[str, torch.Tensor]]:
    """Box predictions per image ``[{boxes (D, 4) xyxy pixels, scores (D,), labels (D,)}]``."""
    heat = torch.sigmoid(out["heat"])
    b, k, h, w = heat.shape
    peaks = heat * (F.max_pool2d(heat, 3, stride=1, padding=1) == heat)  # 3x3 local maxima
    scores, flat = peaks.flatten(1).topk(min(max_detections, k * h * w), dim=1)
    cls, cell = flat // (h * w), flat % (h * w)
    iy, ix = (cell // w).float(), (cell % w).float()
    res = []
    for i in range(b):
        off = out["offset"][i].flatten(1)[:, cell[i]]  # (2, D)
        size = out["size"][i].flatten(1)[:, cell[i]].clamp(-2, 8).exp()
        cx, cy = (ix[i] + off[0]) * STRIDE, (iy[i] + off[1]) * STRIDE
        boxes = torch.stack([cx - size[0] / 2, cy - size[1] / 2, cx + size[0] / 2, cy + size[1] / 2], 1)
        res.append({"boxes": boxes, "scores": scores[i], "labels": cls[i]})
    return res
