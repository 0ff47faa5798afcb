"""npctalk runtime: ONNX Runtime decoding, sampling, dialogue formatting. Imports no torch."""

__version__ = "0.1.0"
