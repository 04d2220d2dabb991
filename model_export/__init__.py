"""PyTorch → ONNX export toolkit for carryover's recurrent-model contract."""
