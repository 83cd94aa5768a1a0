"""lstmkit: LSTMs written from scratch on PyTorch tensor operations."""

from lstmkit.backends.native import available as native_available
from lstmkit.backends.native import empty_cache, memory_pool
from lstmkit.interop import to_torch
from lstmkit.modules import LSTM, BidirectionalLSTM, DeepLSTM, LSTMCell, SimpleLSTM
from lstmkit.state import LSTMState, detach_state

__all__ = [
    "LSTM",
    "BidirectionalLSTM",
    "DeepLSTM",
    "LSTMCell",
    "LSTMState",
    "SimpleLSTM",
    "detach_state",
    "empty_cache",
    "memory_pool",
    "native_available",
    "to_torch",
]
__version__ = "0.1.0"
