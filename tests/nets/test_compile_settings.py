"""``compile`` as a small object a training system is given: the settings reach ``torch.compile`` for the networks it
trains, an unknown mode is refused, and ``compile: true`` / ``false`` stay valid as a shorthand."""

import logging

import pytest
from torch import nn

from ldm.core.config import instantiate_from_config, load_config
from ldm.nets.compile import COMPILE_MODES, Compile, is_compiled
from tests.components import tiny_ldm
from tests.paths import TINY


def test_the_settings_reach_torch_compile_once_per_network(monkeypatch):
    calls = []
    monkeypatch.setattr(nn.Module, "compile", lambda self, **options: calls.append((self, options))
                        or setattr(self, "_compiled_call_impl", self._call_impl))
    system = tiny_ldm("text")
    system.compile_settings = Compile(mode="max-autotune-no-cudagraphs", dynamic=False)
    for network in system.trained_networks():
        system.compile_settings.apply(network, "cpu")
        system.compile_settings.apply(network, "cpu")  # a resumed fit does not compile twice
    assert [c[0] for c in calls] == [system.model.diffusion_model]
    assert calls[0][1] == {"mode": "max-autotune-no-cudagraphs", "dynamic": False, "fullgraph": False,
                           "backend": "inductor"}
    assert is_compiled(system.model.diffusion_model)


def test_an_unknown_mode_is_refused_naming_the_modes():
    with pytest.raises(ValueError, match="'fastest' is not one of torch.compile's: " + ", ".join(COMPILE_MODES)):
        Compile(mode="fastest")
    with pytest.raises(ValueError, match="mode 'max-autotune' is Inductor's: leave it out with backend 'aot_eager'"):
        Compile(mode="max-autotune", backend="aot_eager")


def test_a_backend_that_builds_no_kernels_needs_no_cpu_compiler(monkeypatch):
    monkeypatch.setattr("ldm.nets.compile.compiler_problem", lambda device: "no C++ compiler here")
    layer = nn.Linear(4, 4)
    Compile(backend="aot_eager").apply(layer, "cpu")
    assert is_compiled(layer)
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler here"):
        Compile().apply(nn.Linear(4, 4), "cpu")


@pytest.mark.parametrize("value, expected", [("true", Compile()), ("false", None)])
def test_compile_true_and_false_stay_a_shorthand_without_the_old_config_notice(value, expected, caplog):
    with caplog.at_level(logging.INFO, logger="ldm.core.migrate"):
        cfg = load_config(TINY / "ldm-text.yaml", [f"model.params.compile={value}"])
    node = cfg["model"]["params"]["compile"]
    assert (instantiate_from_config(node, "compile") if node else None) == expected
    assert not caplog.records  # a shorthand, not a config from before the layered package


def test_a_system_without_compile_settings_compiles_nothing():
    system = tiny_ldm("text")
    assert system.compile_settings is None
    assert not any(is_compiled(m) for m in system.modules())
