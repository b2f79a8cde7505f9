"""Shared fixtures: weights files written by the tests."""

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
