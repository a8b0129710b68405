"""gRPC streams to the Triton model, with tritonclient as users call it; test_triton.py runs this
in the Triton environment (tritonclient pins what the project's environment cannot take).

    python triton_client.py URL streams '[{"model": M, "inputs": {...}}, ...]'   one stream each, concurrently
    python triton_client.py URL cancel '{"model": M, "long": {...}, "queued": {...}}'

Prints one JSON object: each stream's text, token ids, finish reason, figures or error.
"""

from __future__ import annotations

import json
import queue
import sys
import threading

import numpy as np
import tritonclient.grpc as grpcclient

WIDE = {"seed"}  # INT64; other integers INT32, as the model's config declares them


def tensor(name: str, value) -> grpcclient.InferInput:
    if isinstance(value, list) or isinstance(value, str):
        array = np.array([v.encode() for v in (value if isinstance(value, list) else [value])], dtype=np.object_)
        kind = "BYTES"
    elif isinstance(value, bool):
        array, kind = np.array([value], dtype=bool), "BOOL"
    elif isinstance(value, int):
        array, kind = (np.array([value], np.int64), "INT64") if name in WIDE else (np.array([value], np.int32), "INT32")
    else:
        array, kind = np.array([value], np.float32), "FP32"
    infer_input = grpcclient.InferInput(name, list(array.shape), kind)
    infer_input.set_data_from_numpy(array)
    return infer_input


class Stream:
    """One request on a gRPC stream of its own."""

    def __init__(self, url: str) -> None:
        self.client = grpcclient.InferenceServerClient(url)
        self.responses: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.responses.put((result, error)))

    def send(self, model: str, inputs: dict) -> None:
        self.client.async_stream_infer(model, [tensor(k, v) for k, v in inputs.items()],
                                       enable_empty_final_response=True)

    def next(self) -> tuple[dict | None, dict | None, bool]:
        """The next response's outputs (or its error: message and gRPC status) and whether it is the final one."""
        result, error = self.responses.get(timeout=120)
        if error is not None:
            return None, {"error": error.message(), "status": error.status()}, True
        final = result.get_response().parameters["triton_final_response"].bool_param
        outputs = {o.name: result.as_numpy(o.name).tolist() for o in result.get_response().outputs}
        return outputs, None, final

    def collect(self) -> dict:
        text, token_ids, figures = "", [], {}
        while True:
            outputs, error, final = self.next()
            if error is not None:
                return error
            if outputs:
                text += b"".join(outputs.pop("text_output", [])).decode()
                token_ids += outputs.pop("token_ids", [])
                figures.update(outputs)
            if final:
                figures["finish_reason"] = figures["finish_reason"][0].decode()
                return {"text": text, "token_ids": token_ids, **figures}

    def close(self, cancel: bool = False) -> None:
        self.client.stop_stream(cancel_requests=cancel)
        self.client.close()


def one(url: str, request: dict) -> dict:
    stream = Stream(url)
    try:
        stream.send(request["model"], request["inputs"])
        return stream.collect()
    finally:
        stream.close()


def streams(url: str, requests: list[dict]) -> list[dict]:
    results: list = [None] * len(requests)

    def run(i: int) -> None:
        results[i] = one(url, requests[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def cancel(url: str, spec: dict) -> dict:
    """A long request takes the one slot; a second waits in the one queue place; a third finds
    the queue full. The long one's stream is then closed, cancelling it: the queued one runs."""
    long = Stream(url)
    long.send(spec["model"], spec["long"])
    first, error, _ = long.next()
    assert error is None, error
    queued = Stream(url)
    queued.send(spec["model"], spec["queued"])
    refused = one(url, {"model": spec["model"], "inputs": spec["queued"]})
    long.close(cancel=True)
    answer = queued.collect()
    queued.close()
    return {"refused": refused, "queued": answer}


if __name__ == "__main__":
    url, scenario, spec = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    print(json.dumps({"streams": streams, "cancel": cancel}[scenario](url, spec)))
