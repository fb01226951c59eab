"""``read_model_config`` applies ``key=value`` overrides to a YAML file, a config dict and an exported file's
carried config alike."""

import pytest
import torch
import yaml

from ldm.core.config import ConfigError, load_config
from ldm.inference.sd import SD_CONFIG_DIR, read_model_config
from ldm.io.checkpoints import METADATA_CONFIG, save_file_atomic

CONFIG = SD_CONFIG_DIR / "v1-inference.yaml"
OVERRIDE = "model.params.unet.params.num_heads=4"


def unet_heads(node: dict) -> int:
    return node["params"]["unet"]["params"]["num_heads"]


def test_overrides_apply_to_a_path_a_dict_and_a_carried_config(tmp_path):
    loaded = load_config(CONFIG)
    assert unet_heads(loaded["model"]) == 8  # the file's own value, which the override changes
    carrier = tmp_path / "model.safetensors"
    save_file_atomic({"w": torch.zeros(1)}, carrier, {METADATA_CONFIG: yaml.safe_dump(loaded)})
    for config, ckpt in ((str(CONFIG), None), (loaded, None), (None, carrier)):
        assert unet_heads(read_model_config(config, ckpt)) == 8
        assert unet_heads(read_model_config(config, ckpt, [OVERRIDE])) == 4
    assert unet_heads(loaded["model"]) == 8  # the given dict is left as it was


def test_a_malformed_override_of_a_dict_is_a_one_line_error():
    with pytest.raises(ConfigError, match="not of the form key=value"):
        read_model_config(load_config(CONFIG), overrides=["model.params"])
