"""Generation for evaluation, RL rollouts and preference generation.

* :mod:`.generate`: batched generation of texts (evaluation, ``vlmalign generate``, chat).
* :mod:`.rollout`: :func:`rollout` -> :class:`RolloutBatch` (k samples per prompt with the
  log-probs they were drawn with, images encoded once) and :func:`sequence_logprobs` /
  :func:`sequence_values` for the training-side recomputation (docs/RL.md, "Rollouts").
"""

from .generate import SamplingConfig, generate, generate_batch
from .rollout import (RolloutBatch, RolloutError, filter_logits, require_vllm, response_stop_mask, rollout,
                      sequence_logprobs, sequence_values)

__all__ = ["SamplingConfig", "generate", "generate_batch", "RolloutBatch", "RolloutError", "filter_logits",
           "require_vllm", "response_stop_mask", "rollout", "sequence_logprobs", "sequence_values"]
