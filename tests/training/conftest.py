"""Fixtures the training tests share."""

import pytest

from tests.toy import TOY_CONFIG


@pytest.fixture
def toy_cfg(tmp_path, monkeypatch):
    """tests.toy's run config written to a file (its targets allowed)."""
    monkeypatch.setenv("LDM_ALLOW_TARGETS", "tests.")
    path = tmp_path / "toy.yaml"
    path.write_text(TOY_CONFIG)
    return path
