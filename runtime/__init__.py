"""The lean APD runtime: loads a bundle and decodes between engine calls. Never imports torch.

    from apd_deploy.runtime import Runtime
    rt = Runtime.load("bundle")
    result = rt.generate("What is 7 + 5?", alg="apd", max_new_tokens=64)
    results = rt.generate_many(["What is 7 + 5?", "What is 3 * 4?"], max_batch=8)
    with rt.scheduler(max_batch=8) as scheduler:       # a server's view: submit from any thread
        handle = scheduler.submit("What is 7 + 5?", temperature=0.7, seed=1)  # a Generation, as from rt.stream
        for chunk in handle: ...                          # chunks as steps commit them
        result = handle.result()
"""

from apd_deploy.runtime.results import Chunk, Generation, GenerationResult
from apd_deploy.runtime.runtime import Runtime
from apd_deploy.runtime.scheduler import QueueFull, Scheduler, SchedulerClosed

__all__ = ["Chunk", "Generation", "GenerationResult", "QueueFull", "Runtime", "Scheduler", "SchedulerClosed"]
