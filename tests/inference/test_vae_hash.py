"""A VAE's weights hash taken from the weights already loaded is the hash of the file on disk (a stage-1 run, a public
SD file, a stage-2 checkpoint's first_stage_model.*), each file is read once for it, and a rewritten file is hashed
anew; Pipeline.from_run reads the run's checkpoint once."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ldm.inference.loaders import load_autoencoder
from ldm.inference.pipeline import Pipeline
from ldm.io.checkpoints import VAE_PREFIX, load_file, save_torch_atomic, state_dict_of, strip_prefix, tensors_hash
from ldm.io.lineage import identify, read_vae_state, vae_hash_of, vae_weights, weights_hash
from ldm.io.runs import CHECKPOINT_DIR, LAST_CHECKPOINT, checkpoint_for
from tests.sd_toy import write_sd_file


def hash_on_disk(path: Path, public: bool = False) -> str:
    """The hash of the VAE weights in a file, read from it now (no memory of earlier reads)."""
    if public:
        return weights_hash(strip_prefix({k: v for k, v in load_file(path).items() if k.startswith(VAE_PREFIX)},
                                         VAE_PREFIX))
    return weights_hash(vae_weights(state_dict_of(load_file(path))))


@pytest.fixture
def reads(monkeypatch):
    """The files torch.load reads from now on, in order."""
    seen: list[Path] = []
    real = torch.load

    def spy(f, *args, **kwargs):
        seen.append(Path(f).resolve())
        return real(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    return seen


def test_a_vae_run_s_hash_from_its_loaded_weights_is_its_file_s(toy_vae_run, tmp_path, reads):
    run = tmp_path / "vae"  # a copy of its own: this process has not hashed it yet
    shutil.copytree(toy_vae_run, run)
    ckpt = run / CHECKPOINT_DIR / LAST_CHECKPOINT
    vae, info = load_autoencoder(run)
    assert vae_hash_of(ckpt) == info["hash"] and reads == [ckpt.resolve()]  # one read: the weights and the hash
    assert info["hash"] == hash_on_disk(ckpt) == tensors_hash(vae.state_dict())  # the file's, and the module's


def test_a_public_file_s_vae_hash_from_its_loaded_weights_is_the_file_s(tmp_path):
    full, config = write_sd_file(tmp_path, seed=5)
    ckpt = tmp_path / "half.safetensors"  # as public files are: fp16, hashed as a network loads them (fp32)
    save_file({k: v.half() if v.is_floating_point() else v for k, v in load_file(full).items()}, str(ckpt))
    vae, info = load_autoencoder(ckpt, config)
    assert info["hash"] == hash_on_disk(ckpt, public=True) == tensors_hash(vae.state_dict())
    assert vae_hash_of(ckpt, public=True) == info["hash"]


def test_a_rewritten_file_is_hashed_anew(toy_vae_run, tmp_path):
    ckpt = tmp_path / "vae.ckpt"
    source = load_file(checkpoint_for(toy_vae_run))
    save_torch_atomic(source, ckpt)
    before = vae_hash_of(ckpt)
    source["state_dict"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in source["state_dict"].items()}
    save_torch_atomic(source, ckpt)
    assert vae_hash_of(ckpt) == hash_on_disk(ckpt) != before
    assert weights_hash(read_vae_state(ckpt)) == vae_hash_of(ckpt)


def test_a_run_loads_reading_its_checkpoint_once_and_holds_its_vae_s_hash(toy_ldm_run, toy_vae_run, reads):
    pipe = Pipeline.from_run(toy_ldm_run)
    ckpt = checkpoint_for(toy_ldm_run).resolve()
    assert reads.count(ckpt) == 1 and set(reads) <= {ckpt, checkpoint_for(toy_vae_run).resolve()}
    assert tensors_hash(pipe.first_stage_model.state_dict()) == hash_on_disk(ckpt) == vae_hash_of(
        checkpoint_for(toy_vae_run))  # the run holds its VAE run's weights
    reads.clear()
    Pipeline.from_run(toy_ldm_run)
    assert reads == [ckpt]  # the VAE run's hash is remembered


def test_a_run_checkpoint_s_identity_is_read_from_it_once(toy_ldm_run, tmp_path, reads):
    ckpt = tmp_path / "copy.ckpt"  # a file this process has not identified or hashed yet
    shutil.copy(checkpoint_for(toy_ldm_run), ckpt)
    found = identify("model.params.first_stage", "vae", str(ckpt), ckpt)
    assert reads == [ckpt.resolve()]  # the VAE's hash and the step from one read
    assert found.step == int(load_file(ckpt)["global_step"]) and found.vae_hash == hash_on_disk(ckpt)
