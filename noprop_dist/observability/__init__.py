"""What a run shows while it trains and leaves to read afterwards: metric definitions (:mod:`.metrics`),
``metrics.jsonl`` and ``report.md`` (:mod:`.run_log`), progress lines (:mod:`.progress`) and TensorBoard
event files (:mod:`.tensorboard`). No Ray import here: the Ray actors export through ``distributed.telemetry``."""
