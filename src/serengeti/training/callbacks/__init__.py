"""The callbacks every ``fit`` attaches (:func:`serengeti.training.run.run`): exact resume, pre-emption,
the non-finite guard; and the step progress bar of ``configs/callbacks/default.yaml``."""
