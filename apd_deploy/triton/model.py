"""An APD bundle as a decoupled Triton Python-backend model; `apd-deploy triton-repo` copies this
file into a repository as `<model>/1/model.py`. It runs inside Triton's Python stub, in the
environment config.pbtxt names (EXECUTION_ENV_PATH).

Each instance loads the bundle once and feeds every request, from any Triton batch, into one
batched scheduler; a request's responses are its steps' chunks as they are committed, then a
final one with the finish reason and the step figures. Errors are responses, never a dead stub:
a bad field is INVALID_ARG naming it, a full queue UNAVAILABLE (retry later). A request the
client gives up on (a gRPC stream closed, Triton's cancellation) is cancelled in the scheduler,
which frees its slot.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from apd_deploy.errors import GenerationError
from apd_deploy.runtime import QueueFull, Runtime, SchedulerClosed
from apd_deploy.server.stops import StopText
from apd_deploy.triton.fields import INPUTS, PROMPT_FIELD, in_triton_terms

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
# How often the cancellation of requests in flight is looked at: a cancelled request goes on
# for at most this long (its decoding steps, a few ms each, are not interrupted).
CANCEL_POLL_SECONDS = 0.05
# How long finalize waits for the requests it cancelled to send their final responses.
FINALIZE_WAIT_SECONDS = 30.0


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        settings = {key: value["string_value"] for key, value in config["parameters"].items()}
        bundle = Path(settings["bundle"])
        if not bundle.is_absolute():  # copied into the repository
            bundle = Path(args["model_repository"]) / bundle
        # A bundle that does not check raises here: the model fails to load and is never ready.
        self.runtime = Runtime.load(bundle, engine=settings["engine"] or None,
                                    threads=int(settings["threads"]) if settings["threads"] else None)
        self.max_queue = int(settings["max_queue"])
        self.scheduler = self.runtime.scheduler(max_batch=int(settings["max_batch"]), max_queue=self.max_queue)
        # The family must outlive its metrics: kept on the instance.
        self.metric_family = pb_utils.MetricFamily(
            name="apd_requests_finished_total", kind=pb_utils.MetricFamily.COUNTER,
            description="Requests ended, by finish reason (stop, length, cancelled)")
        self.finished = {reason: self.metric_family.Metric(labels={"model": args["model_name"], "finish_reason": reason})
                         for reason in ("stop", "length", "cancelled")}
        self.in_flight: dict[Any, Any] = {}  # handle -> its response sender
        # Held for every call on a pb_utils object from our threads (response senders, metrics) and
        # for `in_flight`: the stub's objects are not thread-safe. Two threads incrementing one
        # metric at once crashed tritonserver (SIGSEGV: a metric reuses its shared-memory message),
        # and a sender asked whether it was cancelled after its final response crashed the stub.
        self.lock = threading.Lock()
        self.answered = threading.Condition(self.lock)  # notified as `in_flight` shrinks
        self.closing = threading.Event()
        self.watcher = threading.Thread(target=self._watch_cancellations, name="apd-cancellations", daemon=True)
        self.watcher.start()

    def execute(self, requests: list) -> None:
        """Queue each request and return at once: its responses come from a thread of its own."""
        for request in requests:
            sender = request.get_response_sender()
            try:
                prompt, chat, stops, params = read_request(request)
                handle = self.scheduler.submit(prompt, chat=chat, **params)
            except QueueFull:
                self._refuse(sender, f"the queue is full ({self.max_queue} requests wait for a slot); retry later, or "
                                   "write the repository with a larger --max-queue", pb_utils.TritonError.UNAVAILABLE)
            except SchedulerClosed as exc:
                self._refuse(sender, str(exc), pb_utils.TritonError.UNAVAILABLE)
            except GenerationError as exc:
                self._refuse(sender, in_triton_terms(exc), pb_utils.TritonError.INVALID_ARG)
            else:
                with self.lock:
                    self.in_flight[handle] = sender
                threading.Thread(target=self._respond, args=(handle, sender, StopText(stops)), daemon=True).start()

    def _respond(self, handle: Any, sender: Any, stop: StopText) -> None:
        try:
            final = self._stream(handle, sender, stop)
        except Exception as exc:  # the request failed (its decoding, the engine): the others go on
            final = error_response(f"generation failed: {exc}", pb_utils.TritonError.INTERNAL)
        with self.lock:
            del self.in_flight[handle]
            send_final(sender, final)
            self.answered.notify_all()

    def _refuse(self, sender: Any, message: str, code: Any) -> None:
        with self.lock:
            send_final(sender, error_response(message, code))

    def _stream(self, handle: Any, sender: Any, stop: StopText) -> Any:
        """Send each chunk as its step commits it; the final response, with the figures."""
        for chunk in handle:
            if stop.stopped:
                continue  # the rest of a stopped request, while it ends
            text = stop.push(chunk.text or "")
            if stop.stopped:
                handle.cancel()
            response = pb_utils.InferenceResponse(output_tensors=[strings("text_output", [text]),
                                                                  ints("token_ids", chunk.token_ids)])
            try:
                with self.lock:
                    sender.send(response)
            except Exception:  # the client is gone: stop decoding for it
                handle.cancel()
        result = handle.result()
        reason = "stop" if stop.stopped else result.finish_reason
        with self.lock:
            self.finished[reason].increment(1)
        figures = [strings("text_output", [stop.flush()]), strings("finish_reason", [reason]),
                   ints("steps", [result.steps]), ints("accepted_per_step", result.accepted_per_step),
                   ints("dllm_forwards", [result.dllm_forwards]), ints("verifier_forwards", [result.verifier_forwards]),
                   pb_utils.Tensor("seconds", np.array([result.seconds], np.float32))]
        if result.seed is not None:
            figures.append(pb_utils.Tensor("seed_used", np.array([result.seed], np.int64)))
        return pb_utils.InferenceResponse(output_tensors=figures)

    def _watch_cancellations(self) -> None:
        while not self.closing.wait(CANCEL_POLL_SECONDS):
            with self.lock:
                for handle, sender in self.in_flight.items():
                    if sender.is_cancelled():
                        handle.cancel()

    def finalize(self) -> None:
        """Triton unloads the instance (shutdown, a model reload) once its requests are answered.
        Our threads stop calling the stub here, and the metrics go while it can still delete them:
        the stub tears itself down after this returns (a metric deleted then segfaults it)."""
        self.closing.set()
        self.watcher.join()
        self.scheduler.close(cancel=True)
        with self.answered:
            self.answered.wait_for(lambda: not self.in_flight, FINALIZE_WAIT_SECONDS)
            self.finished.clear()  # the metrics before their family
            del self.metric_family


def read_request(request: Any) -> tuple[str, bool, list[str], dict[str, Any]]:
    """The prompt, chat, stop strings and generation parameters (Runtime keywords) of a request."""
    values = {}
    for field in INPUTS:
        tensor = pb_utils.get_input_tensor_by_name(request, field.name)
        if tensor is None:
            continue
        items = tensor.as_numpy().reshape(-1).tolist()
        if field.data_type == "TYPE_STRING":
            try:
                items = [item.decode("utf-8") for item in items]
            except UnicodeDecodeError:
                raise GenerationError(f"{field.name} is not valid UTF-8 text; send UTF-8") from None
        elif field.data_type == "TYPE_FP32":
            items = [float(str(np.float32(item))) for item in items]  # 0.7, not 0.699999988
        if field.dims == 1 and len(items) != 1:
            raise GenerationError(f"{field.name} takes one value, got {len(items)}")
        values[field.name] = items if field.dims == -1 else items[0]
    if not isinstance(values.get(PROMPT_FIELD), str):
        raise GenerationError(f"{PROMPT_FIELD} is missing; send the prompt text")
    params = {field.keyword: values[field.name] for field in INPUTS if field.keyword and field.name in values}
    return values[PROMPT_FIELD], bool(values.get("chat", False)), values.get("stop", []), params


def strings(name: str, texts: list[str]) -> Any:
    return pb_utils.Tensor(name, np.array([text.encode("utf-8") for text in texts], dtype=np.object_))


def ints(name: str, values: list[int]) -> Any:
    return pb_utils.Tensor(name, np.array(values, np.int32))


def error_response(message: str, code: Any) -> Any:
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))


def send_final(sender: Any, response: Any) -> None:
    """The request's last response. A request the client cancelled takes none but the final flag."""
    try:
        sender.send(response, flags=FINAL)
    except Exception:  # the request is gone (cancelled): the flag alone releases it
        sender.send(flags=FINAL)
