"""Evaluation of trained models: ``evaluate.py``'s tasks (:mod:`.run`), loss/perplexity on a dataset
(:mod:`.perplexity`) and the lm-evaluation-harness adapter (:mod:`.lm_eval_adapter`)."""
