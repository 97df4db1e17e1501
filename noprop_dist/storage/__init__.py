"""What a run keeps on disk: atomic writes (:mod:`.atomic`), the run directory with its checkpoints and
resume (:mod:`.run_dir`), and ``summary.json`` (:mod:`.summary`). No Ray, no torch distributed."""
