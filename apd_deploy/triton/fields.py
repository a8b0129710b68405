"""The Triton model's inputs and outputs, in Triton's LLM generate convention (`text_input` in,
`text_output` out), so `POST /v2/models/<name>/generate_stream` takes a flat JSON body. The
generation parameters are the runtime's table (`PARAMS`), each under the name the HTTP server
gives it: one declaration for the command line, the OpenAI server and Triton.

Imported by the repository writer (config.pbtxt) and by the model inside Triton's stub."""

from __future__ import annotations

from dataclasses import dataclass

from apd_deploy.errors import GenerationError
from apd_deploy.runtime.params import PARAMS
from apd_deploy.server.protocol import field_of as body_field

# Numbers in Triton's usual widths (TensorRT-LLM's models take the same): a C++ client sends
# temperature as FP32 and max_tokens as INT32; a seed needs 63 bits.
TRITON_TYPES = {int: "TYPE_INT32", float: "TYPE_FP32", str: "TYPE_STRING", bool: "TYPE_BOOL"}
WIDE = {"seed": "TYPE_INT64"}


@dataclass(frozen=True)
class Tensor:
    name: str
    data_type: str  # config.pbtxt's TYPE_*
    dims: int = 1  # elements: 1, or -1 for any number
    optional: bool = True
    keyword: str | None = None  # the Runtime keyword it carries, for a generation parameter


INPUTS: tuple[Tensor, ...] = (
    Tensor("text_input", "TYPE_STRING", optional=False),
    Tensor("chat", "TYPE_BOOL"),  # wrap text_input in the bundle's chat template
    Tensor("stop", "TYPE_STRING", dims=-1),  # stop strings: the text ends before the first
    *(Tensor(p.field, WIDE.get(p.name, TRITON_TYPES[p.type]), keyword=p.name) for p in PARAMS if p.field),
)

# Every response carries the text and the token ids its step committed; the last one (flagged
# final) carries no tokens and the request's figures.
OUTPUTS: tuple[Tensor, ...] = (
    Tensor("text_output", "TYPE_STRING"),
    Tensor("token_ids", "TYPE_INT32", dims=-1),
    Tensor("finish_reason", "TYPE_STRING"),  # stop (EOS or a stop string), length or cancelled
    Tensor("steps", "TYPE_INT32"),
    Tensor("accepted_per_step", "TYPE_INT32", dims=-1),
    Tensor("dllm_forwards", "TYPE_INT32"),
    Tensor("verifier_forwards", "TYPE_INT32"),
    Tensor("seconds", "TYPE_FP32"),  # from arrival to the last step
    Tensor("seed_used", "TYPE_INT64"),  # the seed a sampled (temperature > 0) request used
)

PROMPT_FIELD = "text_input"


def field_of(keyword: str) -> str:
    """What the Triton model calls a Runtime keyword (the prompt is text_input)."""
    return PROMPT_FIELD if keyword == "prompt" else body_field(keyword)


def in_triton_terms(exc: GenerationError) -> str:
    """The error's message naming the model's input fields."""
    return exc.in_terms_of(field_of)
