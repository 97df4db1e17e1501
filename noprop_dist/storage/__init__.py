"""What a run keeps on disk: atomic writes (:mod:`.atomic`), the run directory with its checkpoints and
resume (:mod:`.run_dir`). No Ray, no torch distributed."""
