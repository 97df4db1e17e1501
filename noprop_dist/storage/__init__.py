"""What a run keeps on disk: atomic writes (:mod:`.atomic`), the run directory and what the run may delete
there (:mod:`.run_dir`), its lock (:mod:`.lock`), the checkpoints and resume (:mod:`.checkpoints`), and
``summary.json`` (:mod:`.summary`). No Ray, no torch distributed."""
