"""NVIDIA Triton Inference Server: a bundle as a decoupled Python-backend model (`triton-repo`),
and tritonserver from the nvidia-pytriton wheel to serve it (`triton-serve`)."""
