"""One training run: the entry (:mod:`.run`), the LightningModule (:mod:`.lm_task`), optimizer and
schedules (:mod:`.optim`), config checks (:mod:`.config_checks`), dataset-filled keys (:mod:`.run_config`),
global batch arithmetic (:mod:`.global_batch`), checkpoint policy (:mod:`.checkpoint_policy`),
compile (:mod:`.compiling`), loggers, the sweep summary, and :mod:`.callbacks`, the guards every fit attaches."""
