"""Evaluation helpers used by ``evaluate.py`` (lm-evaluation-harness adapter, ...)."""
