"""What compares predicted with real: trace replay against a real deployment (`rollout load`)."""
