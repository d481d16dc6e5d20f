"""Shared test fixtures: small models and data made on the fly (no download)."""

import os

import pytest
import torch

os.environ.setdefault("PL_DISABLE_FORK", "1")
# The models under test are tiny: one intra-op thread is fastest, and immune to the thread-pool contention of a
# busy machine (a small conv2d goes from 0.03 ms to tens of ms when two processes fight over two cores).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_and_scratch_directory(tmp_path, monkeypatch):
    """Every test starts from the same global seed, in its own working directory: runs with ``logger=False``
    write their files (records, checkpoints) under the working directory, never into the repository."""
    torch.manual_seed(0)
    monkeypatch.chdir(tmp_path)
    yield
