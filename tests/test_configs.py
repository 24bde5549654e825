"""Shipped params files (configs/*.yaml) are valid and complete: `cp configs/X.yaml params.yaml && dvc exp
run` must not stop on a missing params section (DVC refuses a stage whose declared params are absent)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from dsink.params import TRAIN_KEYS, TRAINED_SECTIONS, load_params

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def _declared_params() -> set[str]:
    """Every params key dvc.yaml's stages declare, matrix placeholders expanded."""
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    keys = set()
    for stage in dvc["stages"].values():
        matrix = stage.get("matrix", {})
        for key in stage.get("params", []):
            m = re.search(r"\$\{item\.(\w+)\}", key)
            values = matrix[m.group(1)] if m else [None]
            keys |= {key.replace(m.group(0), v) if m else key for v in values}
    return keys


@pytest.mark.parametrize("path", [ROOT / "params.yaml", *CONFIGS], ids=lambda p: p.name)
def test_params_file_is_valid_and_has_every_declared_section(path: Path):
    load_params(path)
    raw = yaml.safe_load(path.read_text())
    for dotted in _declared_params():
        node = raw
        for part in dotted.split("."):
            assert isinstance(node, dict) and part in node, f"{path.name} lacks {dotted!r}"
            node = node[part]


@pytest.mark.parametrize("path", [ROOT / "params.yaml", *CONFIGS], ids=lambda p: p.name)
def test_defaults_and_configs_compare_like_with_like(path: Path):
    """Baselines, teachers and student share backbone, epochs and schedule."""
    p = load_params(path)
    runs = [p.teachers.imbalance, p.teachers.noise, p.baselines.ce, p.baselines.la_small_loss, p.distill]
    for key in ("model", "epochs", "batch_size", "lr", "schedule", "milestones", "augment"):
        assert len({str(getattr(r, key)) for r in runs}) == 1, key


@pytest.mark.parametrize("path", [ROOT / "params.yaml", *CONFIGS], ids=lambda p: p.name)
def test_training_settings_are_written_once(path: Path):
    """The shared `train` section holds every model's training settings; no model repeats them."""
    raw = yaml.safe_load(path.read_text())
    assert set(raw["train"]) == set(TRAIN_KEYS), f"{path.name}: `train` spells out every training key"
    for section in TRAINED_SECTIONS:
        node = raw
        for part in section.split("."):
            node = node[part]
        assert not set(node) & set(TRAIN_KEYS), f"{path.name}: {section} repeats training keys"
