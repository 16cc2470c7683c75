"""Generation for evaluation, RL rollouts and preference generation."""
