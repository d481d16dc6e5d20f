"""Shared test fixtures: small models and data made on the fly (no download)."""

import os

import pytest
import torch

os.environ.setdefault("PL_DISABLE_FORK", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
