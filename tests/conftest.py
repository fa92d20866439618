import pytest

from nti_utils.shapes.world import Scene, Shape
from nti_utils.testing import tiny_pipeline


@pytest.fixture(scope="session")
def tiny_pipe():
    """The tiny SD-architecture pipeline (random weights, built from configs)."""
    return tiny_pipeline()


@pytest.fixture(scope="session")
def small_scene():
    """A 32x32 shapes-world scene, the tiny pipeline's resolution."""
    return Scene((Shape("circle", "red", 14, 15, 8),), "white", resolution=32)
