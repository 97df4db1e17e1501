"""Property: ANY malformed config (unknown key, wrong type, out of range, bad file) makes the real entry
point print exactly one line naming the key, exit 2, print no traceback, and write nothing."""
import contextlib
import io
import os
import typing

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from noprop_dist import run
from noprop_dist.config import Config

SECTIONS = {name: typing.get_type_hints(type(section)) for name, section in vars(Config()).items()}
KEYS = [(s, k, t) for s, hints in SECTIONS.items() for k, t in hints.items()]

# Values that are of the right type but outside the allowed range or set, per key.
OUT_OF_RANGE = {
    "data.name": ["imagenet", "MNIST", ""], "data.train_limit": [0, -5], "data.test_limit": [0],
    "model.num_blocks": [0, -1], "model.embedding": ["onehot", "random"], "model.embedding_dim": [0, -3],
    "model.class_prob": ["sigmoid"], "model.radial_sigma": [0, -1.0], "model.eta": [0.0, -0.1],
    "model.abar_max": [1.0, 0.2, 1.5], "model.dropout": [1.0, -0.1], "train.epochs": [0, -2],
    "train.batch_size": [0], "train.lr": [0.0, -1e-3], "train.weight_decay": [-1.0], "train.seed": [-1],
    "train.sync_mode": ["semi"], "train.sync_every": [0], "train.log_every_seconds": [0],
    "cluster.num_workers": [0, 11, 100], "cluster.gpus_per_worker": [-0.5, 1.5], "cluster.cpus_per_worker": [0],
    "cluster.threads_per_worker": [-1], "cluster.device": ["tpu"], "run.dir": [""],
    "run.checkpoint_every": [0], "eval.batch_size": [0],
}
NOT_A_NUMBER = st.sampled_from(["abc", "[1, 2]", "{a: 1}", "1.2.3", "true", "nan", "inf"])


def _wrong_type(t):
    base = typing.get_args(t)[0] if typing.get_args(t) else t
    if base is bool:
        return st.sampled_from(["maybe", "2", "[true]", "1.5"])
    if base in (int, float):
        return NOT_A_NUMBER.filter(lambda v: not (base is int and v == "true"))
    return st.sampled_from(["[1, 2]", "{a: 1}"])  # str keys: a list or mapping is never a string


@st.composite
def malformed(draw):
    kind = draw(st.sampled_from(["unknown_key", "unknown_section", "wrong_type", "out_of_range", "no_equals"]))
    if kind == "unknown_key":
        section = draw(st.sampled_from(list(SECTIONS)))
        name = draw(st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12).filter(
            lambda n: n not in SECTIONS[section]))
        return f"{section}.{name}=1", f"{section}.{name}"
    if kind == "unknown_section":
        section = draw(st.text("abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=8).filter(
            lambda s: s not in SECTIONS))
        return f"{section}.epochs=1", section
    if kind == "no_equals":
        section, key, _ = draw(st.sampled_from(KEYS))
        return f"{section}.{key}", f"{section}.{key}"
    if kind == "wrong_type":
        section, key, t = draw(st.sampled_from([k for k in KEYS if f"{k[0]}.{k[1]}" not in ("data.root",)]))
        return f"{section}.{key}={draw(_wrong_type(t))}", f"{section}.{key}"
    key = draw(st.sampled_from(sorted(OUT_OF_RANGE)))
    return f"{key}={draw(st.sampled_from(OUT_OF_RANGE[key]))}", key


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bad=malformed(), extra_good=st.booleans())
def test_any_malformed_config_is_one_line_exit_2_and_writes_nothing(tmp_path, bad, extra_good):
    override, key = bad
    run_dir = tmp_path / "existing_run"
    run_dir.mkdir(exist_ok=True)
    (run_dir / "keep.txt").write_text("untouched")
    args = ["--set", f"run.dir={run_dir}"] + (["--set", "train.epochs=2"] if extra_good else []) + ["--set", override]
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = run.main(args)
    lines = err.getvalue().strip().splitlines()
    assert code == 2, (override, err.getvalue())
    assert len(lines) == 1 and lines[0].startswith("error: "), (override, err.getvalue())
    assert key in lines[0], (override, lines[0])
    assert "Traceback" not in err.getvalue() + out.getvalue()
    assert sorted(os.listdir(run_dir)) == ["keep.txt"], "a refused config wrote into the run directory"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(min_size=1, max_size=80))
def test_any_yaml_file_that_is_not_a_valid_config_is_refused_cleanly(tmp_path, text):
    """Random file contents: either a valid config (then not run here) or one clean error line."""
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    from noprop_dist.config import ConfigError, load_config

    try:
        load_config(str(path))
    except ConfigError as e:
        assert "\n" not in str(e)
