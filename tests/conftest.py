"""Shared fixtures: tiny Hugging Face model folders saved to a temporary directory."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from hf_factory import build_hf_model  # noqa: E402


@pytest.fixture
def hf_folder(tmp_path: Path):
    """Factory: save a tiny HF model of a variant to a folder; returns (model, folder)."""

    def make(variant: str, seed: int = 0, **save_options):
        model = build_hf_model(variant, seed)
        folder = tmp_path / variant
        model.save_pretrained(folder, **save_options)
        return model, folder

    return make
