"""The exceptions rwkv-gpu raises. Every one is an `RwkvError` and also the built-in
exception a Python programmer would catch for it: a bad shape or option is a
`ValueError`, a missing checkpoint a `FileNotFoundError`, device memory running out a
`MemoryError`, a failed save an `OSError`. The Rust core picks the class
(`src/python/errors.rs`); this module only declares them, so that they live under
`rwkv_gpu`."""

from __future__ import annotations


class RwkvError(Exception):
    """Base class of every rwkv-gpu error."""


class ModelLoadError(RwkvError):
    """A checkpoint or state file is missing, malformed, foreign or unsupported."""


class ModelNotFoundError(ModelLoadError, FileNotFoundError):
    """The checkpoint or state file does not exist."""


class ModelPermissionError(ModelLoadError, PermissionError):
    """The checkpoint or state file may not be read."""


class DeviceError(RwkvError, RuntimeError):
    """No usable GPU adapter, or the device failed."""


class DeviceLostError(DeviceError):
    """The GPU device was lost (driver reset, removal); open the model again."""


class OutOfMemoryError(DeviceError, MemoryError):
    """Device (or, loading, host) memory ran out; the model and its states are unharmed."""


class ShaderError(DeviceError):
    """A kernel failed to compile on this device."""


class ShapeError(RwkvError, ValueError):
    """Tokens, tensors or states of the wrong shape or range."""


class InvalidOptionError(RwkvError, ValueError):
    """An option out of its range or of the wrong kind; the message names the option."""


class StateError(RwkvError, RuntimeError):
    """A state used by two threads at once, with another model, or not saved."""


class StateSaveError(OSError, StateError):  # OSError first: its errno, filename and str()
    """A state could not be written; an existing file at the path is left as it was."""


class ModelSaveError(RwkvError, OSError):
    """A model could not be written; an existing file at the path is left as it was."""


class QueueFullError(RwkvError, RuntimeError):
    """The Engine's queue of waiting requests is full; try again later."""


class EngineClosedError(RwkvError, RuntimeError):
    """The Engine was closed; it takes no more requests."""


# They are rwkv_gpu's: `rwkv_gpu.ShapeError` in reprs and tracebacks.
for _cls in list(globals().values()):
    if isinstance(_cls, type) and issubclass(_cls, RwkvError):
        _cls.__module__ = "rwkv_gpu"
del _cls

__all__ = [
    "RwkvError",
    "ModelLoadError",
    "ModelNotFoundError",
    "ModelPermissionError",
    "DeviceError",
    "DeviceLostError",
    "OutOfMemoryError",
    "ShaderError",
    "ShapeError",
    "InvalidOptionError",
    "StateError",
    "StateSaveError",
    "ModelSaveError",
    "QueueFullError",
    "EngineClosedError",
]
