"""What torch's weights-only unpickler may build from a checkpoint besides tensors: inert stand-ins for the
objects old Stable Diffusion / latent-diffusion training checkpoints pickle beside their weights.

Nothing from the file runs: a named class becomes ``PickledClassStandIn`` (its pickled state kept as data),
numpy scalars are rebuilt from their bytes for numeric dtypes only, and any other global is refused by torch.
"""

from __future__ import annotations

import os
import pickle

import torch

NUMPY_DTYPE_CLASSES = ("BoolDType", "Int8DType", "Int16DType", "Int32DType", "Int64DType", "UInt8DType",
                       "UInt16DType", "UInt32DType", "UInt64DType", "Float16DType", "Float32DType", "Float64DType")


class PickledClassStandIn:
    """Takes the place of a class that old checkpoints pickle beside their weights (never the class itself)."""

    def __setstate__(self, state: object) -> None:
        self.state = state


def _numpy_scalar(dtype: object, data: bytes = b"") -> object:
    """numpy's scalar reconstructor, limited to numeric dtypes (what a training run's logged scores are)."""
    import numpy as np

    if not isinstance(dtype, np.dtype) or dtype.kind not in "biuf":
        raise pickle.UnpicklingError(f"numpy scalar of dtype {dtype!r} refused (only numbers are read)")
    return np.frombuffer(data, dtype=dtype)[0]


def standins() -> list:
    """What CompVis / Stability's Lightning-era checkpoints pickle beside the weights, as harmless stand-ins.

    PyTorch Lightning 1.x keyed ``callbacks`` by the callback *class* and logged scores as numpy scalars, so
    sd-v1-4.ckpt & co. name those globals; here they unpickle to inert objects, never to the classes, and
    such files load with the weights-only unpickler instead of needing --unsafe-load.
    """
    import numpy as np

    lightning_classes = [f"{package}.callbacks.{module}.{name}"
                         for package in ("pytorch_lightning", "lightning.pytorch")
                         for module, name in (("model_checkpoint", "ModelCheckpoint"),
                                              ("early_stopping", "EarlyStopping"),
                                              ("lr_monitor", "LearningRateMonitor"))]
    scalars = [(_numpy_scalar, f"{core}.multiarray.scalar") for core in ("numpy.core", "numpy._core")]
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25 builds a dtype's state on its own class
    dtype_classes = [getattr(dtypes, name) for name in NUMPY_DTYPE_CLASSES if hasattr(dtypes, name)]
    return [np.dtype, *dtype_classes, *scalars, *[(PickledClassStandIn, name) for name in lightning_classes]]


def torch_load(path: str | os.PathLike, unsafe: bool = False, mmap: bool = False) -> object:
    """torch.load with the weights-only unpickler (plus the stand-ins) unless ``unsafe``."""
    if unsafe:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    allow = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
    if allow is None:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    with allow(standins()):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
