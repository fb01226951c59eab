"""Shared test set-up: offline, toy sizes, runs written under a temporary folder."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LDM_RUNS_DIR", os.path.join(os.environ.get("TMPDIR", "/tmp"), "ldm-test-runs"))
