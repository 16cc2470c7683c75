"""Rewards for online RL: verifiable functions, reward models, VLM judges, and their weighted sum.

    reward = build_reward([{"type": "function", "name": "exact_match", "weight": 1.0},
                           {"type": "model", "path": "runs/rm/checkpoints/step-100/model", "weight": 0.5}],
                          image_root="data/")
    total, parts = reward([RewardInput.from_record(rec, response) for rec, response in ...])

See docs/RL.md.
"""

from .functions import (REWARD_FUNCTIONS, RewardInput, extract_answer, extract_choice, register_reward,
                        resolve_function)
from .sources import (CombinedReward, FunctionReward, JudgeReward, RewardModelSource, RewardSource, build_reward,
                      build_source, parse_score, parse_yes_no)

__all__ = ["REWARD_FUNCTIONS", "RewardInput", "extract_answer", "extract_choice", "register_reward",
           "resolve_function", "CombinedReward", "FunctionReward", "JudgeReward", "RewardModelSource",
           "RewardSource", "build_reward", "build_source", "parse_score", "parse_yes_no"]
