"""Files a run reads and writes, and nothing about models: atomic writes (:mod:`.atomic`), the
checkpoint and export format (:mod:`.checkpoint`) and the run record ``metrics.json`` (:mod:`.run_record`)."""
