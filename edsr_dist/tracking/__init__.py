"""Experiment trackers beside metrics.jsonl (MLflow, Weights & Biases): the side channel and one client each."""
