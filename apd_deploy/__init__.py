"""apd-deploy: ship Adaptive Parallel Decoding (a diffusion LLM drafts, a small AR model verifies).

The pipeline is checkpoint -> `apd_deploy.export` -> ONNX bundle -> `apd_deploy.engines`
-> `apd_deploy.runtime` -> tokens. Importing this package pulls in neither torch nor
onnxruntime; each stage imports what it needs.
"""

__version__ = "0.1.0"
