"""vlmalign refuses a transformers too old for encode-once (mm_encoder_outputs), by name."""

import sys

import pytest

from vlmalign.errors import ModelError
from vlmalign.models import MIN_TRANSFORMERS, _check_transformers


def test_installed_transformers_is_new_enough():
    _check_transformers()


@pytest.mark.parametrize("version", ["5.17.0", "5.0.0", "4.57.1"])
def test_older_transformers_is_refused_with_the_requirement(monkeypatch, version):
    # seen on a GPU machine: 5.17's generate() rejects mm_encoder_outputs deep inside generation
    # the module import finds now: transformers' lazy loader can replace its sys.modules entry
    monkeypatch.setattr(sys.modules["transformers"], "__version__", version)
    with pytest.raises(ModelError, match=rf"transformers>={MIN_TRANSFORMERS} \(found {version}\)"):
        _check_transformers()


def test_the_requirement_matches_pyproject():
    from pathlib import Path
    text = (Path(__file__).resolve().parents[3] / "pyproject.toml").read_text()
    assert f'"transformers>={MIN_TRANSFORMERS},<6"' in text
