"""rwkv-gpu: RWKV-7 language models on any Vulkan, Metal or DX12 GPU.

    import rwkv_gpu
    model = rwkv_gpu.Model("rwkv7-g1-2.9b.pth")
    state = model.new_state()
    logits = model.forward([510, 2302, 33], state)   # np.float32 [vocab]
"""

from ._core import (
    DeviceError,
    ModelLoadError,
    OutOfMemoryError,
    RwkvError,
    ShaderError,
    ShapeError,
    StateError,
    adapters,
    kernel_source,
)
from .model import Model, State
from .tokenizer import StreamDecoder, Tokenizer

__all__ = [
    "Model",
    "State",
    "Tokenizer",
    "StreamDecoder",
    "adapters",
    "kernel_source",
    "RwkvError",
    "ModelLoadError",
    "DeviceError",
    "OutOfMemoryError",
    "ShaderError",
    "ShapeError",
    "StateError",
]
__version__ = "0.1.0"
