"""The ONNX frontend: ONNX decoders loaded with onnx-ir, rewritten by its passes, run in ONNX Runtime."""
