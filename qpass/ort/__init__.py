"""ONNX Runtime beside the torch ops: a graph cut into one stage per attention site and run a stage at a time
(:mod:`qpass.ort.stages`), for the ONNX frontend's layer-wise mode and the ONNX exporter's read-back alike."""
