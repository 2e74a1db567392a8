"""rwkv-gpu: RWKV-7 language models on any Vulkan, Metal or DX12 GPU.

    import rwkv_gpu
    model = rwkv_gpu.Model("rwkv7-g1-2.9b.pth")
    state = model.new_state()
    logits = model.forward([510, 2302, 33], state)   # np.float32 [vocab]
    for piece in model.generate("The capital of France is", max_tokens=32):
        print(piece, end="", flush=True)
"""

from . import errors as _errors
from ._core import adapters, kernel_source
from .conversation import Chat
from .engine import Engine, Request
from .errors import *  # noqa: F403 (the exception classes, listed in errors.__all__)
from .generation import Completion
from .model import Model, State
from .sampling import Sampler, Sampling
from .state_cache import StateCache
from .tokenizer import StreamDecoder, Tokenizer

__all__ = [
    "Model",
    "State",
    "Chat",
    "Engine",
    "Request",
    "Completion",
    "Sampling",
    "Sampler",
    "StateCache",
    "Tokenizer",
    "StreamDecoder",
    "adapters",
    "kernel_source",
]
__all__ += _errors.__all__
__version__ = "0.1.0"
