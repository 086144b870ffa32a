import pytest

from veil.detection.tasks import load_detection_task


@pytest.fixture(scope="session")
def small_task():
    """digits-scenes at a tenth of its size (60 train, 30 held-out, 15 val, 15 test scenes)."""
    return load_detection_task("digits-scenes", seed=0, scale=0.1)
