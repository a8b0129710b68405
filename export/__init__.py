"""Checkpoint -> ONNX: load Hugging Face checkpoint directories, trace them with KV-cache I/O,
check the graphs against PyTorch and write a bundle. Needs torch (`pip install 'apd-deploy[export]'`)."""
