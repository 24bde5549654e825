"""Shared fixtures for the unit tests (keep them small and generic).

- ``repo_root``: the repository root.
- ``write_params(directory, overrides)``: the repo's ``params.yaml`` with dotted-key overrides
  (``{"data.noise.rate": 0.2}``; the value ``write_params.DELETE`` removes a key), written to
  ``directory/params.yaml``.
- ``stage_env``: the environment for stage subprocesses (no progress bars, this venv's python).
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DELETE = object()
_REPO_PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())


def edited_params(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """A deep copy of the repo's params with ``overrides`` (dotted keys) applied."""
    params = copy.deepcopy(_REPO_PARAMS)
    for dotted, value in (overrides or {}).items():
        *parents, last = dotted.split(".")
        node = params
        for key in parents:
            node = node.setdefault(key, {})
        if value is DELETE:
            node.pop(last, None)
        else:
            node[last] = value
    return params


def _write_params(directory: str | Path, overrides: dict[str, Any] | None = None) -> Path:
    path = Path(directory) / "params.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(edited_params(overrides), sort_keys=False))
    return path


_write_params.DELETE = DELETE  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def write_params():
    """``write_params(directory, {"dotted.key": value, ...}) -> Path`` of the written params.yaml."""
    return _write_params


@pytest.fixture(scope="session")
def stage_env() -> dict[str, str]:
    return dict(os.environ, TQDM_DISABLE="1", DSINK_PYTHON=sys.executable, PYTHONUNBUFFERED="1")
