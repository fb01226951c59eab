"""The private torch APIs of ldm.core.private_api still behave as the project relies on (fails when torch changes them)."""

import torch
from torch import nn

from ldm.core.private_api import compiled_call, foreach_lerp_, foreach_norm, inductor_options, set_compiled_call


def test_foreach_norm_and_lerp():
    a, b = [torch.tensor([3.0, 4.0]), torch.ones(4)], [torch.zeros(2), torch.full((4,), 3.0)]
    assert [n.item() for n in foreach_norm(a)] == [5.0, 2.0]
    foreach_lerp_(a, b, 0.5)
    assert torch.equal(a[0], torch.tensor([1.5, 2.0])) and torch.equal(a[1], torch.full((4,), 2.0))


def test_compiled_call_is_what_module_compile_installs_and_call_uses(monkeypatch):
    module = nn.Linear(2, 2)
    assert compiled_call(module) is None
    made = []  # what torch.compile returned to Module.compile (a stand-in: importing dynamo costs a second)
    monkeypatch.setattr(torch, "compile", lambda fn, *args, **kwargs: made.append(lambda *a, **k: fn(*a, **k)) or made[-1])
    module.compile()
    assert made and compiled_call(module) is made[0]
    set_compiled_call(module, lambda x: x * 0 + 7)  # __call__ now routes through the replacement
    assert torch.equal(module(torch.ones(1, 2)), torch.full((1, 2), 7.0))


def test_inductor_options_patch_the_global_config_for_a_block():
    import torch._inductor.config as config

    before = config.freezing
    with inductor_options({"freezing": not before}):
        assert config.freezing is (not before)
    assert config.freezing is before
