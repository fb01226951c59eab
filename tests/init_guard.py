"""``no_random_init``: records every ``torch.nn.init`` call on a real tensor inside it — what loading a module whose
weights all come from a file must not do (``params_on_meta`` builds such modules; on a meta tensor an init is free)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from ldm.io.module_weights import wrapped_initialisers


@contextmanager
def no_random_init() -> Iterator[list[tuple[str, tuple]]]:
    """Inside, each ``torch.nn.init`` function given a real (non-meta) tensor is recorded as ``(function, shape)``
    (and still runs); yields the list of records, which a load without random init leaves empty."""
    touched: list[tuple[str, tuple]] = []

    def recorded(name, function):
        def call(tensor, *args, **kwargs):
            if not tensor.is_meta:
                touched.append((name, tuple(tensor.shape)))
            return function(tensor, *args, **kwargs)
        return call

    with wrapped_initialisers(recorded):
        yield touched
