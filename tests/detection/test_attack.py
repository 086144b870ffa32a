import numpy as np
import pytest
import torch

from veil.defenses import create_defense
from veil.detection.attack import ObjectAttackConfig, crop_objects, object_attack
from veil.detection.tasks import load_detection_task

CONFIG = ObjectAttackConfig(attackers=("linear",), epochs=8, patience=3, views=1, averaging_k=0, recon_epochs=0, exposures=("inference",))


@pytest.fixture(scope="module")
def task():
    return load_detection_task("digits-scenes", seed=0, scale=0.5)  # 150 held-out, 75 val, 75 test scenes


def test_crops_hold_the_object(small_task):
    s = small_task.test
    crops = crop_objects(s.images, s, size=16, margin=1.0)
    assert crops.shape == (len(s.boxes), 1, 16, 16)
    assert torch.all(crops.flatten(1).amax(1) > 0.2), "every crop sees its digit's ink"


def test_object_attack_reads_undefended_digits_and_not_destroyed_ones(task):
    floor = max(task.primary_only_floor(), task.majority_floor())
    assert floor < 0.2  # the primary class (small/large) says little about the digit
    none = object_attack(create_defense("none", input_shape=task.input_shape, num_classes=2), task, CONFIG, log=lambda s: None)
    assert none["accuracy"] > floor + 0.4, none
    destroyed = create_defense("gaussian", input_shape=task.input_shape, num_classes=2, sigma=100.0)
    noise = object_attack(destroyed, task, CONFIG, log=lambda s: None)
    assert noise["accuracy"] < floor + 0.08, noise


def test_detections_are_matched_to_their_objects(small_task):
    # predictions equal to the ground truth give each object its own box's features; a scene without
    # detections leaves its objects missing (NaN), which the attacker's classifier takes as "no detection"
    from veil.detection.attack import _box_features, _matched_detection_features

    s = small_task.test
    preds = []
    for i in range(int(s.scene.max()) + 1):
        objs = torch.nonzero(s.scene == i).flatten()
        preds.append({"boxes": s.boxes[objs].float(), "labels": s.labels[objs], "scores": torch.ones(len(objs))})
    empty = int(s.scene[0])
    preds[empty] = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "scores": torch.zeros(0)}
    feats = _matched_detection_features(preds, s)
    truth = _box_features(s.boxes.float(), s.labels, torch.ones(len(s.labels)))
    missing = (s.scene == empty).numpy()
    assert np.isnan(feats[missing]).all()
    assert np.allclose(feats[~missing], truth[~missing])


def test_the_answer_floor_reads_the_digit_from_true_boxes(task):
    # a box's width and height carry the digit ("1" is narrow): the guess from true boxes and classes beats
    # the guess from the class alone; it is what any detector's correct answer gives away
    from veil.detection.attack import answer_floor

    assert answer_floor(task, CONFIG) > max(task.primary_only_floor(), task.majority_floor()) + 0.05
