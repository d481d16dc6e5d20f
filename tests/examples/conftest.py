"""The quick reproduction, run once for every test module that reads its outputs."""

from __future__ import annotations

from pathlib import Path

import pytest

from examples.reproduce import main


@pytest.fixture(scope="session")
def quick(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One run of ``python -m examples.reproduce --quick``; its output folder (runs under ``<tmp>/runs``)."""
    root = tmp_path_factory.mktemp("reproduce")
    main(["--quick", "--out", str(root / "out"), "--runs-dir", str(root / "runs")])
    return root
