"""Two engines compared call by call: the reference engine drives the decoding, the other engine
gets every call too, and wherever the two pick different argmax rows the gap between the top two
logits is recorded beside the largest logit difference: a disagreement is a near-tie when that gap
is below the engines' own difference."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from apd_deploy.runtime import Runtime


@dataclass
class Disagreement:
    role: str
    gap: float  # the reference's top-1 minus top-2 logit on the row
    difference: float  # the largest |logit difference| between the engines on the row


@dataclass
class Lockstep:
    """An engine that answers with `reference`'s outputs and checks `other`'s on the same call."""

    role: str
    reference: Any
    other: Any
    rows: int = 0
    disagreements: list[Disagreement] = field(default_factory=list)

    def __getattr__(self, name: str) -> Any:  # spec, xp, new_cache, chunk sizes: the reference's
        return getattr(self.reference, name)

    def run(self, calls):
        mine = [(np.array(logits), np.array(kv)) for logits, kv in self.reference.run(calls)]
        theirs = self.other.run(calls)
        for (logits, _), (other, _) in zip(mine, theirs):
            self.rows += len(logits)
            for row in np.flatnonzero(logits.argmax(-1) != np.asarray(other).argmax(-1)):
                top2 = np.sort(logits[row])[-2:]
                self.disagreements.append(Disagreement(self.role, float(top2[1] - top2[0]),
                                                       float(np.abs(logits[row] - other[row]).max())))
        return mine


def lockstep_runtime(reference: Runtime, other: Runtime) -> tuple[Runtime, list[Lockstep]]:
    """A runtime decoding with `reference`'s engines while `other`'s check every call."""
    steps = [Lockstep(role, reference.engines[role], other.engines[role]) for role in ("dllm", "verifier")]
    return replace(reference, dllm=steps[0], verifier=steps[1], open_lanes=None), steps


def explain(steps: list[Lockstep]) -> list[Disagreement]:
    """Print each engine's disagreements; return those that are not near-ties."""
    for step in steps:
        print(f"{step.role}: {len(step.disagreements)} of {step.rows} rows with another argmax: "
              + ", ".join(f"top-2 gap {d.gap:.2e} vs logit difference {d.difference:.2e}" for d in step.disagreements))
    return [d for step in steps for d in step.disagreements if d.gap >= d.difference]
