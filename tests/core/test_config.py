"""Config loading and strict instantiate_from_config."""

import functools
import glob
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from ldm.core.config import (
    ConfigError,
    apply_overrides,
    check_config,
    instantiate_from_config,
    load_config,
)
from ldm.core.config_merge import merge_plain
from ldm.core.migrate import upgrade_config
from tests.paths import REPO_ROOT

# (dest, src) pairs on which OmegaConf.merge's rules differ from a naive update
MERGE_CASES = [({"a": 1}, {"a": "???"}), ({}, {"a": "???"}), ({"a": {"x": 1}}, {"a": "???"}),
               ({"a": {"x": 1}}, {"a": None}), ({"a": None}, {"a": {"x": 1}}), ({"a": "s"}, {"a": {"x": 1}}),
               ({"a": {"x": 1}}, {"a": 5}), ({"a": [1, 2]}, {"a": [3]}), ({"a": {"x": 1}}, {"a": {}}),
               ({"a": {"x": 1, "y": 2}}, {"a": {"x": "${b}"}}), ({"a": [{"x": 1}]}, {"a": [{"y": 1}]}),
               ({"a": {"b": {"c": 1, "d": [1]}}}, {"a": {"b": {"d": [2], "e": None}}})]


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_load_applies_bases_and_overrides(tmp_path):
    write(tmp_path, "base.yaml", "seed: 1\ntrainer: {max_steps: 10, precision: 32}\n")
    child = write(tmp_path, "child.yaml", "base: base.yaml\ntrainer: {max_steps: 20}\nname: x\n")
    cfg = load_config(child, ["trainer.precision=bf16-mixed", "seed=3"])
    assert cfg == {"seed": 3, "name": "x", "trainer": {"max_steps": 20, "precision": "bf16-mixed"}}
    assert isinstance(cfg["trainer"], dict)  # plain containers, not OmegaConf


@pytest.mark.parametrize("dest, src", MERGE_CASES)
def test_plain_merge_follows_omegaconf_and_leaves_its_inputs_alone(dest, src):
    before = repr((dest, src))
    merged = merge_plain(dest, src)
    assert merged == OmegaConf.to_container(OmegaConf.merge(dest, src), resolve=False)
    assert repr((dest, src)) == before


def test_plain_merge_refuses_a_list_meeting_a_mapping_as_omegaconf_does():
    for dest, src in (({"a": {"x": 1}}, {"a": [1]}), ({"a": [1, 2]}, {"a": {"0": 5}})):
        with pytest.raises(TypeError):
            OmegaConf.merge(dest, src)
        with pytest.raises(TypeError, match="cannot merge"):
            merge_plain(dest, src)


def test_an_override_steps_into_a_list_by_index_as_omegaconf_update_does():
    path = REPO_ROOT / "configs" / "ldm" / "shapes-text.yaml"
    overrides = ["callbacks.0.params.steps=2", "callbacks.0.params.conditions.1=a zorb", "callbacks.0.params.x.y=1"]
    expected = OmegaConf.create(load_config(path))
    for override in overrides:
        key, value = override.split("=")
        OmegaConf.update(expected, key, OmegaConf.from_dotlist([f"v={value}"]).v, merge=True)
    assert load_config(path, overrides) == OmegaConf.to_container(expected)
    with pytest.raises(ConfigError, match=r"callbacks.3.params.steps=2: '3' is not an index of the list there \(it has 1 item\)"):
        load_config(path, ["callbacks.3.params.steps=2"])


INTERPOLATION_CASES = [{"a": {"b": 3}, "c": "${a.b}"}, {"a": "x", "c": "p/${a}/q-${a}"}, {"a": "${b}", "b": "${d.e}", "d": {"e": 1}},
                       {"a": None, "c": "${a}"}, {"a": 0.5, "c": "lr${a}"}, {"a": True, "c": "on=${a}"},
                       {"a": {"b": 1}, "c": "${a}"}, {"a": [1, 2], "c": "${a}"}, {"a": 1, "c": "\\${a}"},
                       {"a": {"b": 1, "c": "${.b}"}}, {"a": "x", "c": ["${a}", {"d": "${a}"}]}, {"a-b": {"c_d": 2}, "e": "${a-b.c_d}"}]


@pytest.mark.parametrize("container", INTERPOLATION_CASES)
def test_interpolations_resolve_as_omegaconf_resolves_them(container):
    assert apply_overrides(container, [], "test") == OmegaConf.to_container(OmegaConf.create(container), resolve=True)


@pytest.mark.parametrize("container", [{"c": "${a.b}"}, {"a": "${c}", "c": "${a}"}, {"a": "???", "c": "${a}"}])
def test_an_interpolation_omegaconf_cannot_resolve_is_a_config_error(container):
    with pytest.raises(ConfigError, match="test: cannot apply overrides"):
        apply_overrides(container, [], "test")


@pytest.mark.parametrize("path", sorted(glob.glob(str(REPO_ROOT / "configs" / "**" / "*.yaml"), recursive=True)))
def test_every_shipped_config_loads_as_omegaconf_merges_and_resolves_it(path):
    overrides = ["trainer.max_steps=3", "seed=7"]
    expected = OmegaConf.merge(*yaml_chain(path), OmegaConf.from_dotlist(overrides))  # in order, into a copy
    assert load_config(path, overrides) == upgrade_config(OmegaConf.to_container(expected, resolve=True), path)


def yaml_chain(path: str) -> list:
    """A config file's `base:` files (depth first, in order) and then the file itself, each parsed by OmegaConf
    without its `base:` key (shared between calls: never change them)."""
    bases, cfg = _parsed(str(Path(path).resolve()))
    chain = []
    for base in bases:
        chain += yaml_chain(str(Path(path).parent / base))
    return chain + [cfg]


@functools.cache
def _parsed(path: str) -> tuple[list[str], DictConfig]:
    """A config file's `base:` entries and the rest of it, parsed by OmegaConf once per test process."""
    cfg = OmegaConf.load(path)
    bases = cfg.pop("base", None) or []
    return ([bases] if isinstance(bases, str) else list(bases)), cfg


def test_load_rejects_unknown_top_level_key_and_bad_override(tmp_path):
    path = write(tmp_path, "c.yaml", "traner: {max_steps: 1}\n")
    with pytest.raises(ConfigError, match="traner.*did you mean 'trainer'"):
        load_config(path)
    ok = write(tmp_path, "ok.yaml", "seed: 0\n")
    with pytest.raises(ConfigError, match="key=value"):
        load_config(ok, ["trainer.max_steps"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_instantiate_builds_nested_nodes():
    node = {"target": "torch.nn.Sequential", "params": {}}
    assert isinstance(instantiate_from_config(node), torch.nn.Sequential)
    node = {"target": "torch.nn.Linear", "params": {"in_features": 3, "out_features": 2, "bias": False}}
    lin = instantiate_from_config(node)
    assert lin.weight.shape == (2, 3) and lin.bias is None


def test_nested_node_is_built_first():
    node = {"target": "torch.optim.SGD", "params": {"params": [{"target": "torch.nn.Parameter", "params": {"data": [1.0]}}], "lr": 0.1}}
    with pytest.raises(Exception):  # Parameter(data=list) is not a tensor: the nested node really was built
        instantiate_from_config(node)


@pytest.mark.parametrize(
    "node, message",
    [
        ({"target": "torch.nn.Linear", "params": {"in_features": 3, "out_featurs": 2}}, r"model\.params\.out_featurs.*did you mean 'out_features'"),
        ({"target": "torch.nn.Linear", "params": {"in_features": 3}}, r"model\.params\.out_features: required"),
        ({"target": "torch.nn.Linear", "params": {"in_features": "3", "out_features": 2}}, r"model\.params\.in_features: expected int"),
        ({"target": "torch.nn.Linaer", "params": {}}, r"model\.target.*did you mean 'Linear'"),
        ({"target": "torch.nope.Thing"}, r"model\.target: cannot import"),
        ({"target": "os.system", "params": {"command": "echo hi"}}, r"outside the allowed packages"),
        ({"params": {}}, r"model: missing `target`"),
        ({"target": "torch.nn.ReLU", "parms": {}}, r"model\.parms: unknown key.*'params'"),
    ],
)
def test_instantiate_errors_name_the_path(node, message):
    with pytest.raises(ConfigError, match=message):
        instantiate_from_config(node, "model")
    with pytest.raises(ConfigError, match=message):
        check_config(node, "model")


def test_nested_error_names_full_path():
    node = {"target": "torch.nn.Sequential", "params": {}}
    outer = {"target": "torch.optim.SGD", "params": {"params": {"target": "torch.nn.Linear", "params": {"in_feature": 1}}}}
    with pytest.raises(ConfigError, match=r"model\.params\.params\.params\.in_feature"):
        check_config(outer, "model")
    check_config(node, "model")


def test_allow_targets_widens_explicitly(monkeypatch):
    node = {"target": "collections.OrderedDict", "params": {}}
    with pytest.raises(ConfigError, match="LDM_ALLOW_TARGETS"):
        instantiate_from_config(node)
    monkeypatch.setenv("LDM_ALLOW_TARGETS", "collections.")
    assert instantiate_from_config(node) == {}


def test_literal_and_optional_errors_list_the_choices():
    node = {"target": "ldm.nets.unet.attention.CrossAttention", "params": {"query_dim": 8, "backend": "flash"}}
    with pytest.raises(ConfigError, match=r"expected one of 'auto', 'sdpa', 'xformers', 'math', got str 'flash'"):
        instantiate_from_config(node, "m")


def test_config_section_fills_defaults_and_names_typos_and_missing_keys():
    from ldm.core.config import config_section

    defaults, required = {"batch_size": 64}, ("dir",)
    assert config_section({"cache": {"dir": "c"}}, "cache", defaults, required) == {"dir": "c", "batch_size": 64}
    assert config_section({}, "guard", {"nonfinite": "stop"}) == {"nonfinite": "stop"}
    with pytest.raises(ConfigError, match=r"cache\.batch_sise: unknown key \(did you mean 'batch_size'\?\)"):
        config_section({"cache": {"dir": "c", "batch_sise": 8}}, "cache", defaults, required)
    with pytest.raises(ConfigError, match=r"^cache\.dir: required$"):
        config_section({"cache": {"batch_size": 8}}, "cache", defaults, required)
    with pytest.raises(ConfigError, match=r"no `cache:` section \(dir\) for the latents"):
        config_section({}, "cache", defaults, required, "for the latents")
