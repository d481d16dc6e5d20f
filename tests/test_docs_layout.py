"""The "where things live" page names files that exist, and every module of the package is on it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "layout.md"


def _named_paths() -> set[str]:
    pattern = r"`((?:lightning_sensitivity|examples|benchmarks|tests|docs)/[\w/.]+\.(?:py|md))`"
    return set(re.findall(pattern, PAGE.read_text()))


def test_every_path_the_page_names_exists():
    named = _named_paths()
    assert len(named) > 40
    missing = sorted(path for path in named if not (ROOT / path).is_file())
    assert missing == [], f"docs/layout.md names files that do not exist: {missing}"


def test_every_module_of_the_package_and_the_reproduction_is_on_the_page():
    named = _named_paths()
    modules = [
        path.relative_to(ROOT).as_posix()
        for folder in (
            "lightning_sensitivity/functional",
            "lightning_sensitivity/metrics",
            "lightning_sensitivity/callbacks",
            "examples/paper",
        )
        for path in sorted((ROOT / folder).glob("*.py"))
        if path.name != "__init__.py"
    ]
    assert [module for module in modules if module not in named] == []
