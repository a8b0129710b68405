"""apd-deploy: ship Adaptive Parallel Decoding (a diffusion LLM drafts, a small AR model verifies).

The pipeline is checkpoint -> `apd_deploy.export` -> ONNX bundle -> `apd_deploy.engines`
-> `apd_deploy.runtime` -> tokens. Importing this package pulls in neither torch nor
onnxruntime; each stage imports what it needs.
"""

import os as _os

__version__ = "0.1.0"

# In the repository the pipeline folders (export/, engines/, runtime/) sit beside this one and
# only an install maps them under apd_deploy.*. Python run from the repository root imports this
# source folder ahead of any installed copy, so without this its subpackages would not resolve.
# An installed copy has no pyproject.toml beside it and is left alone.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "pyproject.toml")) and _os.path.isfile(_os.path.join(_root, "export", "__init__.py")):
    __path__.append(_root)
