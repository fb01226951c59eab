"""Toy SD 1.x / 2.x and ControlNet systems and files the checkpoint tests of tests/io share (each module its own)."""

import pytest

from ldm.inference.sd import load_sd
from tests.io.sd_files import save
from tests.sd_toy import public_state, shared_tiny_system, tiny_config, tiny_system


@pytest.fixture(scope="module")
def sd1():
    """A toy SD1 system (shared by the test process: only read) and its weights as a public file holds them (HF CLIP
    names, EMA, schedule buffers)."""
    system = shared_tiny_system("v1-inference")
    return system, public_state(system)


@pytest.fixture(scope="module")
def sd2():
    """A toy SD 2.x system (open_clip text encoder), only read."""
    return tiny_system("v2-inference", seed=2)


@pytest.fixture(scope="module")
def sd1_file(sd1, tmp_path_factory):
    return save(sd1[1], tmp_path_factory.mktemp("sd1") / "tiny-sd1.safetensors", "safetensors")


@pytest.fixture(scope="module")
def sd1_model(sd1_file):
    """``sd1_file`` loaded as the public path loads it (EMA weights), for the tests that only read the model."""
    return load_sd(tiny_config("v1-inference"), sd1_file)


@pytest.fixture(scope="module")
def control_system():
    """A toy SD 1.x + ControlNet system, only read."""
    return tiny_system("controlnet-v1", seed=4)
