"""ONNX graphs -> runnable engines (onnxruntime everywhere, TensorRT on NVIDIA GPUs)."""
