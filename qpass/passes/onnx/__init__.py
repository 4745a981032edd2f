"""onnx-ir passes over ONNX graphs."""
