"""The per-shard metrics as TensorBoard event files, when ``metrics.tensorboard: true``.

``<run.dir>/tensorboard/shard_01/`` ... hold one TensorBoard run per shard, so ``tensorboard --logdir run.dir``
draws every shard's loss on one chart; ``tensorboard/chain/`` holds the test accuracy of the assembled chain at
each evaluation. The x axis is the shard's optimizer steps (the chain's: epochs). Needs the ``tensorboard``
package (the optional extra ``noprop_dist[tensorboard]``); the writer is torch's ``SummaryWriter``.
"""
from __future__ import annotations

import math
import os
from typing import Any

from ..storage.run_dir import TENSORBOARD_DIR
# metrics.jsonl field -> TensorBoard tag; what a user compares across shards
SCALARS = {
    "loss": "loss",
    "loss_ema": "loss_ema",
    "samples_per_second": "samples_per_second/wall",
    "compute_samples_per_second": "samples_per_second/compute",
    "step_seconds_mean": "step_seconds_mean",
    "embedding_version_lag": "shared_state/embedding_version_lag",
}


class TensorBoardLog:
    """Writes the rows ``run_log.MetricsLog`` appends to metrics.jsonl, one TensorBoard run per shard."""

    def __init__(self, run_dir: str) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # torch raises ImportError naming tensorboard when it is missing
            raise ImportError(f"metrics.tensorboard: {e}; pip install 'noprop_dist[tensorboard]'") from None
        self._writer_cls = SummaryWriter
        self.root = os.path.join(run_dir, TENSORBOARD_DIR)
        self.writers: dict[str, Any] = {}

    def _writer(self, name: str) -> Any:
        if name not in self.writers:
            self.writers[name] = self._writer_cls(log_dir=os.path.join(self.root, name))
        return self.writers[name]

    def write_rows(self, rows: list[dict[str, Any]]) -> None:
        """metrics.jsonl rows (one per shard, see ``MetricsLog._row``): their numeric fields, at the shard's step."""
        for row in rows:
            writer = self._writer(f"shard_{int(row['block']):02d}")
            for field, tag in SCALARS.items():
                value = row.get(field)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    writer.add_scalar(tag, float(value), global_step=int(row["total_steps"]),
                                      walltime=float(row["time"]))
        for writer in self.writers.values():
            writer.flush()

    def write_accuracy(self, epoch: int | float, accuracy: float, train_seconds: float, split: str = "test") -> None:
        """The chain's accuracy on ``split`` (test, or val when the run has a validation split) after ``epoch``
        epochs (tag ``<split>_accuracy``, and against training time). A fractional budget (train.epochs = 0.5)
        is drawn at the epoch it ends in: TensorBoard's steps are whole."""
        writer = self._writer("chain")
        writer.add_scalar(f"{split}_accuracy", accuracy, global_step=math.ceil(epoch))
        writer.add_scalar(f"{split}_accuracy_vs_train_seconds", accuracy, global_step=int(round(train_seconds)))
        writer.flush()

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()
        self.writers.clear()
