"""The lean APD runtime: loads a bundle and decodes between engine calls. Never imports torch.

    from apd_deploy.runtime import Runtime
    rt = Runtime.load("bundle")
    result = rt.generate("What is 7 + 5?", alg="apd", max_new_tokens=64)
"""

from apd_deploy.runtime.runtime import Chunk, Generation, GenerationResult, Runtime

__all__ = ["Chunk", "Generation", "GenerationResult", "Runtime"]
