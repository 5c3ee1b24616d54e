"""Scoring merges: lm-eval runs, `merge verify`'s checks and the logit comparison."""
