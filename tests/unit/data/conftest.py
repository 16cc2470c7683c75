"""Fixtures for the data-layer tests: the shared sample files (skipped with a reason when
the shared/ folder is missing)."""

from __future__ import annotations

from pathlib import Path

import pytest

FORMATS = Path(__file__).resolve().parents[3] / ".." / "shared" / "data" / "formats"


@pytest.fixture
def formats_dir() -> Path:
    if not FORMATS.is_dir():
        pytest.skip(f"shared sample files not found at {FORMATS.resolve()} (expected the "
                    "shared/ folder beside the repository root)")
    return FORMATS.resolve()


@pytest.fixture
def sample_images(formats_dir) -> Path:
    return formats_dir / "resonance" / "images"
