"""Your own detection data in COCO format: ``coco:IMAGES_DIR,ANNOTATIONS.json``.

Read with pycocotools (the reference COCO API) after veil's own checks, so a broken file gives one line
naming the problem: the JSON must hold ``images``, ``annotations`` and ``categories`` (none empty); every
annotation names a known image and category and has a box ``[x, y, w, h]`` with positive size inside its
image (1 pixel of slack); every image file exists and opens. Images are read as grayscale (PIL), resized
to ``size`` x ``size`` with their boxes; categories become primary classes 0..K-1 in id order. An
annotation may carry an integer ``secondary`` (the attribute the attack predicts); otherwise it is -1
and the object attack is not run on it.

:func:`write_coco` writes scenes in the same format (PNG images + one JSON), which the tests read back.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import torch

from veil.detection.scenes import Scenes

#: Most images / annotations one file may declare (a larger file is refused before it is read further).
MAX_IMAGES, MAX_ANNOTATIONS = 200_000, 2_000_000


def read_coco_spec(spec: str, size: int = 64) -> Scenes:
    """``IMAGES_DIR,ANNOTATIONS.json`` -> :func:`read_coco`."""
    parts = spec.split(",")
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"coco task must be coco:IMAGES_DIR,ANNOTATIONS.json, got coco:{spec}")
    return read_coco(parts[0], parts[1], size=size)


def read_coco(images_dir: str | Path, annotations: str | Path, *, size: int = 64) -> Scenes:
    """Read a COCO detection dataset into :class:`Scenes` of ``size`` x ``size`` grayscale images."""
    from PIL import Image, UnidentifiedImageError
    from pycocotools.coco import COCO

    images_dir, ann = Path(images_dir), Path(annotations)
    if not images_dir.is_dir():
        raise FileNotFoundError(f"{images_dir}: no such image folder")
    if not ann.is_file():
        raise FileNotFoundError(f"{ann}: no such annotation file")
    try:
        data = json.loads(ann.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{ann}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{ann}: a COCO file is a JSON object with images, annotations and categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list) or not data[key]:
            raise ValueError(f"{ann}: '{key}' is missing or empty; a COCO detection file needs images, annotations and categories")
    if len(data["images"]) > MAX_IMAGES or len(data["annotations"]) > MAX_ANNOTATIONS:
        raise ValueError(f"{ann}: more than {MAX_IMAGES} images or {MAX_ANNOTATIONS} annotations")
    _check(data, ann)
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    cat_ids = sorted(coco.getCatIds())
    cat_index = {c: i for i, c in enumerate(cat_ids)}
    names = tuple(str(coco.loadCats(c)[0].get("name", c)) for c in cat_ids)
    img_ids = sorted(coco.getImgIds())
    images = np.zeros((len(img_ids), 1, size, size), np.float32)
    boxes, labels, secondary, scene = [], [], [], []
    for i, img_id in enumerate(img_ids):
        info = coco.loadImgs(img_id)[0]
        path = images_dir / str(info["file_name"])
        if not path.is_file():
            raise FileNotFoundError(f"{ann}: image id {img_id}: file {path} not found")
        try:
            with Image.open(path) as im:
                w, h = im.size
                images[i, 0] = np.asarray(im.convert("L").resize((size, size), Image.BILINEAR), np.float32) / 255.0
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"{path}: not a readable image ({err})") from err
        if (w, h) != (info["width"], info["height"]):
            raise ValueError(f"{ann}: image id {img_id} is {w}x{h} pixels, but the file declares {info['width']}x{info['height']}")
        sx, sy = size / w, size / h
        for a in coco.loadAnns(coco.getAnnIds(imgIds=img_id)):
            x, y, bw, bh = (float(v) for v in a["bbox"])
            boxes.append([min(x * sx, size), min(y * sy, size), min((x + bw) * sx, size), min((y + bh) * sy, size)])
            labels.append(cat_index[a["category_id"]])
            secondary.append(int(a.get("secondary", -1)))
            scene.append(i)
    return Scenes(torch.from_numpy(images), torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), torch.tensor(labels, dtype=torch.long),
                  torch.tensor(secondary, dtype=torch.long), torch.tensor(scene, dtype=torch.long), names)


def _check(data: dict, ann: Path) -> None:
    """One line naming the first broken image, category or annotation."""
    sizes = {}
    for im in data["images"]:
        if not (isinstance(im, dict) and isinstance(im.get("id"), int) and isinstance(im.get("file_name"), str)
                and all(isinstance(im.get(k), int) and not isinstance(im.get(k), bool) and im.get(k) > 0 for k in ("width", "height"))):
            raise ValueError(f"{ann}: every image needs an integer id, a file_name and positive integer width and height, got {str(im)[:120]}")
        if "/" in im["file_name"] or im["file_name"] in ("", ".", ".."):
            raise ValueError(f"{ann}: image id {im['id']}: file_name {im['file_name']!r} must name a file inside the image folder")
        sizes[im["id"]] = (im["width"], im["height"])
    cats = set()
    for c in data["categories"]:
        if not (isinstance(c, dict) and isinstance(c.get("id"), int)):
            raise ValueError(f"{ann}: every category needs an integer id, got {str(c)[:120]}")
        cats.add(c["id"])
    for a in data["annotations"]:
        if not isinstance(a, dict) or not isinstance(a.get("id"), int):
            raise ValueError(f"{ann}: every annotation needs an integer id, got {str(a)[:120]}")
        if a.get("image_id") not in sizes:
            raise ValueError(f"{ann}: annotation {a['id']} names unknown image id {a.get('image_id')!r}")
        if a.get("category_id") not in cats:
            raise ValueError(f"{ann}: annotation {a['id']} has unknown category {a.get('category_id')!r}; categories: {sorted(cats)}")
        box = a.get("bbox")
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)):
            raise ValueError(f"{ann}: annotation {a['id']}: bbox must be [x, y, width, height] numbers, got {box!r}")
        w, h = sizes[a["image_id"]]
        x, y, bw, bh = box
        if bw <= 0 or bh <= 0 or x < -1 or y < -1 or x + bw > w + 1 or y + bh > h + 1:
            raise ValueError(f"{ann}: annotation {a['id']}: box {box} lies outside image {a['image_id']} ({w}x{h}) or has no area")
        if "secondary" in a and not (isinstance(a["secondary"], int) and 0 <= a["secondary"] < 100_000):
            raise ValueError(f"{ann}: annotation {a['id']}: secondary must be an integer in [0, 100000), got {a['secondary']!r}")


def write_coco(scenes: Scenes, images_dir: str | Path, annotations: str | Path) -> None:
    """Write ``scenes`` as PNG images (8-bit grayscale) and a COCO JSON (atomically)."""
    from PIL import Image

    from veil.io import atomic_path, write_json

    images_dir = Path(images_dir)
    images_dir.mkdir(parents=True, exist_ok=True)
    _, _, h, w = scenes.images.shape
    imgs, anns = [], []
    for i in range(len(scenes)):
        name = f"{i:06d}.png"
        with atomic_path(images_dir / name) as tmp:
            Image.fromarray((scenes.images[i, 0].clamp(0, 1).numpy() * 255).round().astype(np.uint8)).save(tmp, format="PNG")
        imgs.append({"id": i + 1, "file_name": name, "width": w, "height": h})
    for j in range(len(scenes.boxes)):
        x0, y0, x1, y1 = scenes.boxes[j].tolist()
        a = {"id": j + 1, "image_id": int(scenes.scene[j]) + 1, "category_id": int(scenes.labels[j]) + 1, "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0}
        if int(scenes.secondary[j]) >= 0:
            a["secondary"] = int(scenes.secondary[j])
        anns.append(a)
    cats = [{"id": c + 1, "name": n} for c, n in enumerate(scenes.class_names)]
    write_json(annotations, {"images": imgs, "annotations": anns, "categories": cats})
