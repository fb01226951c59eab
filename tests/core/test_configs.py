"""Every YAML under configs/ loads and passes the strict config check (targets import, params fit)."""

from pathlib import Path

import pytest

from ldm.core.config import check_config, load_config
from ldm.training.driver import validate
from ldm.training.reflow import INHERITED, reflow_section
from ldm.training.sd_finetune import complete_from_base
from tests.paths import REPO_ROOT

CONFIGS = sorted((REPO_ROOT / "configs").rglob("*.yaml"))


def test_there_are_configs():
    assert len(CONFIGS) >= 4


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO_ROOT / "configs")))
def test_config_checks(path: Path, tmp_path: Path):
    cfg = load_config(path)
    if (cfg["model"].get("params") or {}).get("base_ckpt"):  # a fine-tune: the model comes from the base's config
        stand_in = tmp_path / "base.safetensors"  # completing reads the base's config, never its weights
        stand_in.touch()
        config = cfg["model"]["params"].get("base_config")  # a file scripts/export.py writes: SD 1.x's stands in
        config = config if config and Path(config).is_file() else REPO_ROOT / "configs" / "sd" / "v1-inference.yaml"
        cfg = load_config(path, [f"model.params.base_ckpt={stand_in}", f"model.params.base_config={config}"])
        complete_from_base(cfg)
    if "reflow" in cfg:  # the model comes from the source run: take it from the flow config the run would use
        reflow_section(cfg)
        flow = load_config(path.parent / ("ldm-flow.yaml" if path.parent.name == "tiny" else "shapes-text-flow.yaml"))
        for key in INHERITED:
            cfg["model"]["params"].setdefault(key, flow["model"]["params"].get(key))
    if "data" in cfg or "trainer" in cfg:  # a training config: every section
        validate(cfg)
        if "cache" in cfg:
            from ldm.training.cache import cache_section

            cache_section(cfg)
    else:  # an inference config (configs/sd/): the model alone
        check_config(cfg["model"], "model")
