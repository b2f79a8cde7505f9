"""Shared fixtures: weights files written by the tests, and a picture to draw."""

import numpy as np
import pytest
import torch
import torchvision


@pytest.fixture(scope="session")
def resnet18_weights(tmp_path_factory) -> str:
    """A ResNet-18 state dict with fixed random weights, written to a file."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return str(path)


@pytest.fixture
def picture():
    """A grey 48 x 48 image, a 24 x 24 map hot in one corner block, the true mask there."""
    rng = np.random.default_rng(0)
    image = rng.integers(60, 200, size=(48, 48), dtype=np.uint8)
    anomaly_map = rng.uniform(0, 1, size=(24, 24))
    anomaly_map[4:10, 4:10] += 5
    mask = np.zeros((48, 48), dtype=bool)
    mask[8:20, 8:20] = True  # the same block at the image's resolution
    return image, anomaly_map, mask
