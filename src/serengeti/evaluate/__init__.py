"""Evaluation of trained models: ``evaluate.py``'s tasks (:mod:`.run`), loss/perplexity on a dataset
(:mod:`.perplexity`) and the lm-evaluation-harness adapter (:mod:`.lm_eval_adapter`)."""


class EvalError(ValueError):
    """Bad evaluation settings or input; the message names the key and what was expected."""
