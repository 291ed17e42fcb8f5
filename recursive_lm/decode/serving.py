"""Types shared by the serving front ends: the exit policy, the result, checks."""
from __future__ import annotations

import dataclasses
import math

import jax

from recursive_lm.config import ModelConfig
from recursive_lm.early_exit import confidence as C

Array = jax.Array

EXIT_MEASURES = ("softmax_max", "softmax_diff", "entropy", "state")


@dataclasses.dataclass(frozen=True)
class ExitPolicy:
  """Per-token early exit at loop boundaries.

  ``measure``: a confidence of ``early_exit.confidence`` computable from one
  exit: ``softmax_max``, ``softmax_diff``, ``entropy`` (from the exit logits)
  or ``state`` (cosine of the loop's input and output states). A token exits
  after loop n < N-1 iff ``confidence >= threshold``; ``+inf`` never exits.
  Skipped loops' KV is filled by state copying (see ``decode.loopwise``).
  """
  measure: str = "softmax_max"
  threshold: float = math.inf

  def __post_init__(self):
    if self.measure not in EXIT_MEASURES:
      raise ValueError(f"exit measure {self.measure!r} is not supported for "
                       f"depth-wise batching; choose one of {EXIT_MEASURES}")


def check_recursive(cfg: ModelConfig, what: str):
  if cfg.plan.loops < 2:
    raise ValueError(
        f"{what} needs a recursive model (a shared block looped >= 2 times); this "
        f"model's depth plan {cfg.plan} has loops={cfg.plan.loops}. Convert it with "
        "recursive_lm.recursive (e.g. Cycle sharing, 2+ loops), or decode it with "
        "decode.engine.Engine")


def exit_confidence(policy: ExitPolicy, logits: Array, h_in: Array, h_out: Array):
  if policy.measure == "state":
    return C.hidden_cosine(h_in, h_out)
  return C.get_confidence_fn(policy.measure)(logits)


@dataclasses.dataclass
class BatchOutput:
  """Result of serving a list of requests (in request order)."""
  tokens: list[list[int]]          # new tokens per request (up to and incl. EOS)
  loops: list[list[int]]           # loops of the shared block run for each token
  prompt_lengths: list[int]
  seconds: float                   # end to end (prefill, steps, scheduling)
  prefill_seconds: float           # host-side prefill time (0: prefill runs in the loop)
  steps: int                       # jitted block applications (all slots at once)
  slot_steps: int                  # steps x slots
  active_slot_steps: int           # of those, slots holding a live request
  head_calls: int = 0              # LM-head applications outside prefill
  prefill_passes: int = 0          # chunked-prefill passes

  @property
  def new_tokens(self) -> int:
    return sum(len(t) for t in self.tokens)

  @property
  def tokens_per_second(self) -> float:
    return self.new_tokens / max(self.seconds, 1e-9)

  @property
  def mean_loops_per_token(self) -> float:
    n = sum(len(x) for x in self.loops)
    return sum(sum(x) for x in self.loops) / max(n, 1)

  @property
  def utilization(self) -> float:
    return self.active_slot_steps / max(self.slot_steps, 1)
