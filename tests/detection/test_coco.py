import json

import pytest
import torch

from veil.detection.coco import read_coco, write_coco


def test_round_trip(small_task, tmp_path):
    s = small_task.test
    write_coco(s, tmp_path / "img", tmp_path / "ann.json")
    r = read_coco(tmp_path / "img", tmp_path / "ann.json", size=64)
    assert r.class_names == s.class_names
    assert torch.equal(r.labels, s.labels) and torch.equal(r.secondary, s.secondary) and torch.equal(r.scene, s.scene)
    assert torch.allclose(r.boxes, s.boxes)
    assert (r.images - s.images).abs().max() <= 1 / 255 + 1e-6  # 8-bit PNG


def test_as_a_task(small_task, tmp_path):
    from veil.detection.tasks import load_detection_task

    write_coco(small_task.train, tmp_path / "img", tmp_path / "ann.json")
    task = load_detection_task(f"coco:{tmp_path / 'img'},{tmp_path / 'ann.json'}")
    assert len(task.train) + len(task.held_out) + len(task.val) + len(task.test) == len(small_task.train)


def _write(tmp_path, data):
    (tmp_path / "img").mkdir(exist_ok=True)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    return tmp_path / "img", path


GOOD = {"images": [{"id": 1, "file_name": "a.png", "width": 10, "height": 10}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4]}],
        "categories": [{"id": 1, "name": "thing"}]}


@pytest.mark.parametrize("change, message", [
    (lambda d: d["annotations"][0].update(bbox=[8, 8, 6, 6]), "lies outside image"),
    (lambda d: d["annotations"][0].update(bbox=[1, 1, 0, 3]), "no area"),
    (lambda d: d["annotations"][0].update(category_id=7), "unknown category 7"),
    (lambda d: d.update(annotations=[]), "'annotations' is missing or empty"),
    (lambda d: d["annotations"][0].update(image_id=9), "unknown image id 9"),
    (lambda d: d["images"][0].update(file_name="../etc/passwd"), "inside the image folder"),
])
def test_bad_annotations_give_one_line(tmp_path, change, message):
    data = json.loads(json.dumps(GOOD))
    change(data)
    with pytest.raises(ValueError, match=message) as err:
        read_coco(*_write(tmp_path, data))
    assert "\n" not in str(err.value)


def test_empty_and_broken_files(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "empty.json").write_text("")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_coco(tmp_path / "img", tmp_path / "empty.json")
    (tmp_path / "obj.json").write_text("{}")
    with pytest.raises(ValueError, match="missing or empty"):
        read_coco(tmp_path / "img", tmp_path / "obj.json")
    with pytest.raises(FileNotFoundError, match="not found"):
        read_coco(*_write(tmp_path, GOOD))  # a.png does not exist
