"""Export SSCD checkpoints to ONNX, TensorRT and a Triton model repository."""
