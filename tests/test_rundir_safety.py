"""A run directory that is safe to share: the run deletes only its own files (never through a symlink out of
run.dir), survives a torn metrics line, refuses a config.yaml that is not a run's, and admits one driver."""
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import yaml

from noprop_dist.config import ConfigError, load_config
from noprop_dist.observability.run_log import METRICS_FILE, MetricsLog, read_metrics
from noprop_dist.storage.atomic import append_lines, read_jsonl, repair_torn_tail
from noprop_dist.storage.run_dir import CONFIG_HISTORY, RunDir


def _save(rd: RunDir, epoch: int) -> None:
    blocks = {t: {"block": {"w": torch.full((3,), float(epoch + t))}} for t in (1, 2)}
    rd.checkpoints.save_epoch(epoch, blocks, {"shared": {"e": torch.zeros(2)}}, train_seconds=float(epoch))


def _history(path, warn=print) -> list[dict]:
    return read_jsonl(str(path / CONFIG_HISTORY), warn)


def _prepared(path, *sets) -> RunDir:
    rd = RunDir(str(path))
    rd.prepare(load_config(None, [f"run.dir={path}", *sets]))
    return rd


def test_pruning_keeps_files_the_run_did_not_write(tmp_path):
    rd = _prepared(tmp_path)
    (tmp_path / "checkpoints" / "other_model.ckpt").write_text("a user's model")
    (tmp_path / "checkpoints" / "block_01.e0001.pt.bak").write_text("a user's backup copy")
    os.makedirs(tmp_path / "checkpoints" / "old_runs")
    for epoch in range(1, 5):
        _save(rd, epoch)
    names = set(os.listdir(rd.checkpoints.dir))
    assert {"other_model.ckpt", "block_01.e0001.pt.bak", "old_runs"} <= names
    assert {n for n in names if n.endswith(".pt")} == {
        f"{k}.e{e:04d}.pt" for k in ("block_01", "block_02", "shared") for e in (3, 4)}


def test_a_checkpoint_name_not_in_any_manifest_is_not_deleted(tmp_path):
    """The name pattern alone proves nothing: a file the manifests never listed may be somebody else's."""
    rd = _prepared(tmp_path)
    stray = tmp_path / "checkpoints" / "block_07.e0001.pt"
    stray.write_bytes(b"copied here by hand")
    for epoch in range(1, 4):
        _save(rd, epoch)
    assert stray.read_bytes() == b"copied here by hand"


def test_overwrite_removes_only_the_runs_own_files(tmp_path):
    rd = _prepared(tmp_path)
    _save(rd, 1)
    _save(rd, 2)
    (tmp_path / "metrics.jsonl").write_text('{"block": 1}\n')
    (tmp_path / "checkpoints" / "other_model.ckpt").write_text("mine")
    os.makedirs(tmp_path / "checkpoints" / "subdir")
    (tmp_path / "notes.txt").write_text("mine")
    _prepared(tmp_path, "model.embedding=one_hot", "run.overwrite=true")
    assert sorted(os.listdir(rd.checkpoints.dir)) == ["other_model.ckpt", "subdir"]
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "metrics.jsonl").exists() and rd.checkpoints.read_manifest() is None


# Every file and directory a run writes, appends to or repairs, as a symlink to something outside run.dir.
LINKED = ["metrics.jsonl", CONFIG_HISTORY, "summary.json", "report.md", "curve.json", "chain.pt", "chain_last.pt",
          "manifest.json", "config.yaml", "checkpoints", "tensorboard"]


@pytest.mark.parametrize("name", LINKED)
@pytest.mark.parametrize("overwrite", [False, True])
def test_a_run_file_that_is_a_symlink_out_of_run_dir_is_refused_and_nothing_behind_it_touched(tmp_path, name,
                                                                                               overwrite):
    """Bug seen: a metrics.jsonl linked to a file outside run.dir was repaired and appended through the link (the
    file lost its last line and gained the run's metrics); a linked checkpoints/ grew without pruning. Each
    kind of file is refused with one line naming it, before anything is written, overwrite or not."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    target = outside / name
    if name in ("checkpoints", "tensorboard"):
        target.mkdir()
        (target / "block_01.e0001.pt").write_text("a checkpoint's name, somebody else's file")
    else:
        target.write_text("somebody else's file\nits last line, no newline")
    before = {p.name: p.read_bytes() for p in outside.rglob("*") if p.is_file()}
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(target, run / name)
    cfg = load_config(None, [f"run.dir={run}", f"run.overwrite={str(overwrite).lower()}"])
    with pytest.raises(ConfigError) as e:
        RunDir(str(run)).prepare(cfg)
    assert str(e.value).startswith(f"run.dir: {run / name} is a symlink") and "\n" not in str(e.value)
    assert sorted(os.listdir(run)) == [name], "something was written before the refusal"
    assert {p.name: p.read_bytes() for p in outside.rglob("*") if p.is_file()} == before


def test_appends_and_repairs_never_follow_a_symlink(tmp_path):
    """Also where a link appears after the checks (a race): the append and the torn-line repair refuse it."""
    target = tmp_path / "theirs.txt"
    target.write_text("their first line\ntheir torn line")
    link = tmp_path / "metrics.jsonl"
    os.symlink(target, link)
    with pytest.raises(OSError):
        append_lines(str(link), ['{"a": 1}'])
    with pytest.raises(OSError):
        repair_torn_tail(str(link))
    assert target.read_text() == "their first line\ntheir torn line"


@pytest.mark.parametrize("content", ["model: [1, 2]\n", "- a list\n", "name: another tool\n", "a: [unclosed\n",
                                     b"\xff\xfe not utf-8\n"])
def test_a_config_yaml_that_is_not_a_runs_is_refused_and_kept(tmp_path, content):
    path = tmp_path / "config.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    before = path.read_bytes()
    with pytest.raises(ConfigError, match="config.yaml") as e:
        _prepared(tmp_path, "run.overwrite=true")
    assert "\n" not in str(e.value)
    assert path.read_bytes() == before


def test_run_dir_that_is_a_file_is_one_line(tmp_path):
    path = tmp_path / "run"
    path.write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        RunDir(str(path)).check(load_config(None, [f"run.dir={path}"]))
    with pytest.raises(ConfigError, match="is a file"):
        with RunDir(str(path)).lock.hold():
            pass
    with pytest.raises(ConfigError, match="cannot create or lock"):
        with RunDir(str(path / "below")).lock.hold():  # a directory below a file
            pass


def test_a_torn_last_line_is_cut_off_once_and_appends_go_on(tmp_path):
    path = tmp_path / METRICS_FILE
    append_lines(str(path), [json.dumps({"block": 1, "n": 1})])
    with open(path, "a") as f:
        f.write('{"block": 2, "n"')  # the driver died here
    said = []
    MetricsLog(str(tmp_path), "r", 5.0, warn=said.append)
    assert len(said) == 1 and "torn last line" in said[0]
    append_lines(str(path), [json.dumps({"block": 3, "n": 3})])
    assert [r["block"] for r in read_metrics(str(tmp_path), warn=said.append)] == [1, 3]
    assert len(said) == 1, "an intact file gives no message"
    assert repair_torn_tail(str(path)) == 0


def test_unreadable_lines_are_skipped_with_one_message(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n{"a": \n[1, 2]\n{"a": 4}\n{"a"')
    said = []
    assert read_jsonl(str(path), warn=said.append) == [{"a": 1}, {"a": 4}]
    assert len(said) == 1 and "skipped 3 unreadable lines (first: line 2)" in said[0]


HOLDER = textwrap.dedent("""
    import sys, time
    from noprop_dist.storage.run_dir import RunDir
    with RunDir(sys.argv[1]).lock.hold("a test holder"):
        print("held", flush=True)
        time.sleep(600)
""")


def test_a_second_driver_is_refused_with_one_line_naming_the_holder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        out = subprocess.run([sys.executable, "-m", "noprop_dist.run", "--set", f"run.dir={tmp_path}",
                              "train.epochs=1"], capture_output=True, text=True, timeout=300)
        assert out.returncode == 2, out.stderr
        lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and f"pid {holder.pid}" in lines[0] and "a test holder" in lines[0], out.stderr
        assert not os.path.exists(tmp_path / "config.yaml"), "a refused driver wrote to run.dir"
    finally:
        holder.kill()
        holder.wait()
    # The holder died without releasing anything: its lock is taken over.
    with RunDir(str(tmp_path)).lock.hold("the next run"):
        info = json.loads((tmp_path / ".lock").read_text())
        assert info["pid"] == os.getpid() and info["what"] == "the next run"


def test_the_lock_is_released_when_the_body_fails(tmp_path):
    rd = RunDir(str(tmp_path))
    with pytest.raises(RuntimeError):
        with rd.lock.hold():
            raise RuntimeError("boom")
    t0 = time.perf_counter()
    with rd.lock.hold():
        pass
    assert time.perf_counter() - t0 < 5
    assert oct(os.stat(tmp_path / ".lock").st_mode & 0o777) == "0o600"


def test_fewer_epochs_than_the_run_dir_holds_is_refused(tmp_path):
    rd = _prepared(tmp_path, "train.epochs=3")
    for epoch in (1, 2, 3):
        _save(rd, epoch)
    before = (tmp_path / "config.yaml").read_bytes()
    with pytest.raises(ConfigError, match="train.epochs=2: run.dir .* already holds 3 epochs"):
        _prepared(tmp_path, "train.epochs=2")
    assert (tmp_path / "config.yaml").read_bytes() == before
    _prepared(tmp_path, "train.epochs=3")  # the same: a re-evaluation
    _prepared(tmp_path, "train.epochs=5")  # more: a resume


AUTH_CHECK = textwrap.dedent("""
    import sys
    from noprop_dist.config import ConfigError
    from noprop_dist.distributed.cluster import connect
    try:
        connect(1, quiet=True, dashboard=False)
    except ConfigError as e:
        print("refused:", e)
        sys.exit(2)
    import ray
    from ray._raylet import AuthenticationMode, get_authentication_mode
    print("started; token auth:", get_authentication_mode() == AuthenticationMode.TOKEN)
    ray.shutdown()
""")


def test_a_cluster_without_token_authentication_is_refused(tmp_path):
    env = os.environ | {"RAY_AUTH_MODE": "disabled"}
    out = subprocess.run([sys.executable, "-c", AUTH_CHECK], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "RAY_AUTH_MODE=disabled" in out.stdout and "cluster.allow_unauthenticated=true" in out.stdout


def test_the_cluster_it_starts_has_token_authentication_on_explicitly():
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    out = subprocess.run([sys.executable, "-c", AUTH_CHECK], capture_output=True, text=True, env=env, timeout=180)
    assert out.returncode == 0 and "started; token auth: True" in out.stdout, out.stdout + out.stderr[-2000:]


def test_the_token_file_is_made_private(tmp_path):
    from noprop_dist.distributed.cluster import protect_token_file

    token = tmp_path / "auth_token"
    token.write_text("secret")
    os.chmod(token, 0o644)
    protect_token_file(token)
    assert oct(os.stat(token).st_mode & 0o777) == "0o600"


def test_the_holder_itself_checks_and_prepares_under_its_lock(tmp_path):
    """check() refuses a run.dir that another process holds, not the one its own driver holds."""
    rd = RunDir(str(tmp_path))
    cfg = load_config(None, [f"run.dir={tmp_path}"])
    with rd.lock.hold():
        rd.prepare(cfg)
        assert rd.check(cfg) is False


def test_every_invocation_keeps_its_config_in_the_history(tmp_path):
    """Guards: prepare() rewrote config.yaml on every invocation, so the configs of earlier invocations (and
    when they ran) were lost. config.yaml stays the current config; config_history.jsonl gets one line each."""
    rd = _prepared(tmp_path, "train.epochs=3")
    for epoch in (1, 2, 3):
        _save(rd, epoch)
    _prepared(tmp_path, "train.epochs=5", "train.log_every_seconds=9")  # a resume with more epochs
    history = _history(tmp_path)
    assert [h["epochs_done"] for h in history] == [0, 3]
    assert [h["config"]["train"]["epochs"] for h in history] == [3, 5]
    assert history[1]["config"]["train"]["log_every_seconds"] == 9 and all(h["time"] for h in history)
    current = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert current == history[-1]["config"] and current["train"]["epochs"] == 5


def test_a_torn_history_line_is_cut_off_before_the_next_one(tmp_path):
    """A crash mid-append leaves a torn last line: the next invocation's line starts on a line of its own."""
    _prepared(tmp_path)
    with open(tmp_path / CONFIG_HISTORY, "a") as f:
        f.write('{"time": "2026-')
    _prepared(tmp_path, "train.epochs=30")
    assert [h["config"]["train"]["epochs"] for h in _history(tmp_path, warn=pytest.fail)] == [20, 30]


def test_overwrite_removes_the_history_and_a_foreign_file_stays(tmp_path):
    """run.overwrite clears the old run's history with its other files (the new run's starts afresh); a file
    of the user's beside it, or one behind a symlink named like it, is never deleted."""
    _prepared(tmp_path)
    _prepared(tmp_path)
    assert len(_history(tmp_path)) == 2
    (tmp_path / "config_history.jsonl.bak").write_text("mine")
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "config.0001.yaml").write_text("mine too")
    _prepared(tmp_path, "model.embedding=one_hot", "run.overwrite=true")
    history = _history(tmp_path)
    assert len(history) == 1 and history[0]["config"]["model"]["embedding"] == "one_hot"
    assert (tmp_path / "config_history.jsonl.bak").read_text() == "mine"
    assert (tmp_path / "configs" / "config.0001.yaml").read_text() == "mine too"

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    target = elsewhere / "history.jsonl"
    target.write_text("not the run's\n")
    run = tmp_path / "run"
    _prepared(run)
    os.remove(run / CONFIG_HISTORY)
    os.symlink(target, run / CONFIG_HISTORY)
    RunDir(str(run)).clear()
    assert target.exists() and (run / CONFIG_HISTORY).is_symlink(), "clear() deleted through a symlink"
    with pytest.raises(ConfigError, match=f"{CONFIG_HISTORY} is a symlink"):
        _prepared(run)  # an append would follow the symlink into the user's file
    assert target.read_text() == "not the run's\n"


def test_a_refused_invocation_adds_no_history_line(tmp_path):
    """check() writes nothing: a config refused for its run.dir leaves the history as it was."""
    _prepared(tmp_path)
    before = (tmp_path / CONFIG_HISTORY).read_bytes()
    with pytest.raises(ConfigError):
        _prepared(tmp_path, "model.embedding=one_hot")
    assert (tmp_path / CONFIG_HISTORY).read_bytes() == before
