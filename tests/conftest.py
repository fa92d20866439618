import pytest
import torch

from nti_utils.models import load_pipeline
from nti_utils.shapes.world import Scene, Shape
from nti_utils.testing import tiny_pipeline


@pytest.fixture(scope="session")
def saved_and_loaded(tmp_path_factory):
    """Factory: ``saved_and_loaded(name, build)`` saves the pipeline `build()` makes to a temporary
    folder and loads it back with `load_pipeline` (CPU, float32), as a user's checkpoint folder
    would be; returns (folder, pipeline)."""

    def make(name: str, build):
        folder = tmp_path_factory.mktemp(name)
        build().save_pretrained(folder)
        return folder, load_pipeline(folder, device="cpu", dtype=torch.float32)

    return make


@pytest.fixture(scope="session")
def tiny_pipe():
    """The tiny SD-architecture pipeline (random weights, built from configs)."""
    return tiny_pipeline()


@pytest.fixture(scope="session")
def small_scene():
    """A 32x32 shapes-world scene, the tiny pipeline's resolution."""
    return Scene((Shape("circle", "red", 14, 15, 8),), "white", resolution=32)
