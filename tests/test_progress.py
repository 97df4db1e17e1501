"""The per-block progress display in non-terminal mode (CI, `ray job logs`)."""
import io

from noprop_dist.observability.progress import ProgressDisplay
from noprop_dist.training import ShardStats


def _stats(block, epochs_done, step, spe=10, total_steps=None):
    st = ShardStats(shard=block, epochs_done=epochs_done, step=step, steps_per_epoch=spe,
                    total_steps=total_steps if total_steps is not None else epochs_done * spe + step,
                    samples=1280, compute_seconds=2.0, loss_ema=0.5)
    return st.as_dict()


def test_plain_mode_prints_one_line_per_block_at_most_every_interval():
    out = io.StringIO()
    d = ProgressDisplay(total_epochs=3, stream=out, interval=3600, tty=False)
    d.update({1: _stats(1, 0, 4), 2: _stats(2, 0, 3)}, {1: 0, 2: 1})
    d.update({1: _stats(1, 0, 5), 2: _stats(2, 0, 4)}, {1: 0, 2: 1})  # within the interval: silent
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert "block  1 w0 | epoch 1/3 step 4/10" in lines[0] and "640 samples/s" in lines[0]
    assert "block  2 w1" in lines[1]
    assert "\x1b" not in out.getvalue(), "no terminal escapes when the output is not a terminal"
    d.update({1: _stats(1, 3, 0), 2: _stats(2, 3, 0)}, force=True)
    assert "| done |" in out.getvalue().splitlines()[-1]


def test_blocks_not_started_say_so():
    out = io.StringIO()
    d = ProgressDisplay(total_epochs=1, stream=out, tty=False)
    d.update({7: ShardStats(shard=7).as_dict()})
    assert "block  7 | starting" in out.getvalue()


def test_terminal_mode_redraws_in_place():
    out = io.StringIO()
    d = ProgressDisplay(total_epochs=2, stream=out, tty=True)
    d.update({1: _stats(1, 0, 1)})
    d.update({1: _stats(1, 0, 2)})
    assert "\x1b[1F" in out.getvalue()  # cursor back up one line before the redraw
