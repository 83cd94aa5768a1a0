"""lstmkit: LSTMs written from scratch on PyTorch tensor operations."""

from lstmkit.modules import LSTM, BidirectionalLSTM, DeepLSTM, LSTMCell, SimpleLSTM

__all__ = ["LSTM", "BidirectionalLSTM", "DeepLSTM", "LSTMCell", "SimpleLSTM"]
__version__ = "0.1.0"
