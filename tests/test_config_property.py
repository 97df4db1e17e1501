"""Property: ANY malformed config (unknown key, wrong type, out of range, bad file) makes the real entry
point print exactly one line naming the key, exit 2, print no traceback, and write nothing. The same for the
run directory's own files damaged at random, and for any array given to ``--predict``."""
import contextlib
import io
import json
import os
import tempfile
import typing

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from noprop_dist import run
from noprop_dist.config import Config, ConfigError, load_config
from noprop_dist.observability.run_log import MetricsLog, read_metrics
from noprop_dist.storage.checkpoints import CheckpointError, CheckpointStore
from noprop_dist.storage.run_dir import RunDir

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
    "cluster.threads_per_worker": [-1], "cluster.device": ["tpu"],  # run.dir= (null): a new directory
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


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.one_of(st.binary(max_size=80), st.just(b"\xff\xfe\x00model: 1")))
def test_any_bytes_as_the_config_file_are_a_config_or_one_config_error(tmp_path, content):
    """Guards: a --config file that is not UTF-8 raised UnicodeDecodeError (a traceback) instead of one line."""
    from noprop_dist.config import ConfigError

    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    try:
        load_config(str(path))
    except ConfigError as e:
        assert "\n" not in str(e)


# ----------------------------------------------------------------------------- the run directory's own files
# What a user's invocation reads from run.dir before it starts anything (config.yaml, manifest.json) and what
# it opens once it runs (metrics.jsonl), damaged at random: the entry point goes on or ends in one line.

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


class WouldStartRay(Exception):
    """The invocation got past every check of run.dir to the point where it would start Ray: accepted."""


@pytest.fixture
def up_to_ray(monkeypatch):
    """``run.main`` as a user runs it, stopped where it would start Ray (and with the digits data cached)."""
    from noprop_dist.data import load_dataset
    from noprop_dist.distributed import driver

    cached = load_dataset("digits")

    def stop(cfg, log=None):
        raise WouldStartRay

    monkeypatch.setattr(driver, "_connect_checked", stop)
    monkeypatch.setattr(driver, "dataset_for", lambda *a, **k: cached)

    def invoke(run_dir: str) -> tuple[int | None, list[str]]:
        err, out = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                code = run.main(["--set", f"run.dir={run_dir}", "train.epochs=3"])
            except WouldStartRay:
                code = None
        return code, [ln for ln in err.getvalue().splitlines() if ln.strip()]

    return invoke


def _valid_config() -> dict:
    return load_config(None, ["train.epochs=3"]).to_dict()


def _valid_manifest() -> dict:
    entry = {"file": "block_01.e0002.pt", "sha256": "0" * 64}
    return {"format": 1, "epochs_done": 2, "train_seconds": 1.5, "files": {"block_1": entry, "shared": entry},
            "previous": None}


@st.composite
def mutated(draw, valid: dict) -> dict:
    """``valid`` with one field (at any depth) replaced by a random JSON value, or deleted."""
    out = json.loads(json.dumps(valid))
    node = out
    while True:
        key = draw(st.sampled_from(sorted(node)))
        if isinstance(node[key], dict) and node[key] and draw(st.booleans()):
            node = node[key]
            continue
        if draw(st.booleans()):
            node[key] = draw(JSON_VALUES)
        else:
            del node[key]
        return out


def _accepted_or_one_line(code: int | None, lines: list[str]) -> None:
    if code is None:
        assert lines == [], lines
        return
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, lines)
    assert "Traceback" not in lines[0]


RUN_FILE_CONTENT = st.one_of(
    st.binary(max_size=200),
    JSON_VALUES.map(lambda v: yaml.safe_dump(v).encode()),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.one_of(RUN_FILE_CONTENT, mutated(_valid_config()).map(lambda c: yaml.safe_dump(c).encode())))
def test_any_config_yaml_in_run_dir_is_accepted_or_one_line(tmp_path, up_to_ray, content):
    """Random bytes, random YAML and a run's config with one field damaged, as <run.dir>/config.yaml: the real
    entry point goes on (up to starting Ray) or ends in one error line, exit 2; the file is kept as it was."""
    run_dir = tempfile.mkdtemp(dir=tmp_path)
    path = os.path.join(run_dir, "config.yaml")
    with open(path, "wb") as f:
        f.write(content)
    _accepted_or_one_line(*up_to_ray(run_dir))
    with open(path, "rb") as f:
        assert f.read() == content
    assert sorted(os.listdir(run_dir)) == ["config.yaml"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.one_of(RUN_FILE_CONTENT, JSON_VALUES.map(lambda v: json.dumps(v).encode()),
                         mutated(_valid_manifest()).map(lambda m: json.dumps(m).encode())))
def test_any_manifest_in_run_dir_is_accepted_or_one_line(tmp_path, up_to_ray, content):
    """Random bytes, random JSON and a valid manifest with one field damaged, beside the run's own config.yaml:
    the entry point goes on or ends in one line (a CheckpointError), and resuming from it too."""
    run_dir = tempfile.mkdtemp(dir=tmp_path)
    RunDir(run_dir).prepare(load_config(None, [f"run.dir={run_dir}", "train.epochs=3"]))
    with open(os.path.join(run_dir, "manifest.json"), "wb") as f:
        f.write(content)
    _accepted_or_one_line(*up_to_ray(run_dir))
    try:
        CheckpointStore(run_dir).load_resume(10, warn=lambda _: None)
    except CheckpointError as e:
        assert "\n" not in str(e)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.one_of(st.binary(max_size=200),
                         st.lists(JSON_VALUES.map(json.dumps), max_size=5).map(lambda ls: "\n".join(ls).encode())))
def test_any_metrics_jsonl_in_run_dir_is_opened_and_read(tmp_path, up_to_ray, content):
    """Random bytes or lines as <run.dir>/metrics.jsonl: the run's checks pass, the log opens (a torn tail
    cut off) and appends, and reading it skips what does not parse: never an exception."""
    run_dir = tempfile.mkdtemp(dir=tmp_path)
    RunDir(run_dir).prepare(load_config(None, [f"run.dir={run_dir}", "train.epochs=3"]))
    with open(os.path.join(run_dir, "metrics.jsonl"), "wb") as f:
        f.write(content)
    code, lines = up_to_ray(run_dir)
    assert code is None and lines == [], lines
    log = MetricsLog(run_dir, "r", 0.0, warn=lambda _: None)
    block = {"block": 1, "epochs_done": 0, "step": 1, "steps_per_epoch": 2, "total_steps": 1, "samples": 8,
             "samples_per_second": 1.0, "compute_seconds": 1.0, "sync_seconds": 0.0, "loss": 1.0,
             "loss_ema": 1.0, "last_epoch_mean_loss": float("nan")}
    assert log.record({1: block}, {}, {1: 0}, event="epoch")
    rows = read_metrics(run_dir, warn=lambda _: None)
    assert all(isinstance(r, dict) for r in rows) and rows[-1]["block"] == 1


# ----------------------------------------------------------------------------- --predict arrays

@pytest.fixture(scope="module")
def chain_run(tmp_path_factory) -> str:
    """A run directory with an untrained tiny chain of (1, 8, 8) images (its spec is what predict checks)."""
    from test_chain import _chain

    run_dir = tmp_path_factory.mktemp("chain_run")
    _chain().save(str(run_dir / "chain.pt"), extra={"mean": [0.3], "std": [0.35]})
    return str(run_dir)


@st.composite
def image_arrays(draw):
    """Arrays of a random dtype and ndim 1-5: random shapes, and shapes near the chain's (N, 1, 8, 8) /
    (N, 8, 8) so that the value checks are reached too; floats in [0, 1], beyond it, and NaN."""
    dtype = draw(st.sampled_from([np.uint8, np.float32, np.float64, np.int64, np.bool_]))
    n = draw(st.integers(0, 4))
    shape = draw(st.one_of(hnp.array_shapes(min_dims=1, max_dims=5, max_side=9),
                           st.sampled_from([(n, 1, 8, 8), (n, 8, 8), (n, 3, 8, 8), (n, 1, 8, 7)])))
    if np.dtype(dtype).kind == "f":
        elements = st.one_of(st.floats(0, 1, width=np.dtype(dtype).itemsize * 8),
                             st.floats(allow_nan=True, width=np.dtype(dtype).itemsize * 8))
        fill = st.floats(0, 1, width=np.dtype(dtype).itemsize * 8)
    else:
        elements = fill = None
    return draw(hnp.arrays(dtype, shape, elements=elements, fill=fill))


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(images=image_arrays())
def test_any_array_given_to_predict_is_predicted_or_one_line(chain_run, tmp_path, images):
    """``python -m noprop_dist.evaluate RUN --predict FILE.npy`` on any array: N predictions (only for what
    predict() documents) or one error line naming the file, exit 2, and no output file."""
    from noprop_dist import evaluate

    src, out = os.path.join(tmp_path, "images.npy"), os.path.join(tmp_path, "preds.npy")
    if os.path.exists(out):
        os.remove(out)
    np.save(src, images)
    err, stdout = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(stdout):
        code = evaluate.main([chain_run, "--predict", src, "--out", out])
    lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
    documented = (images.dtype == np.uint8 or images.dtype.kind == "f") and (
        images.shape[1:] == (1, 8, 8) or (images.ndim == 3 and images.shape[1:] == (8, 8)))
    if images.dtype.kind == "f" and images.size:
        documented = documented and bool(np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1)
    if code == 0:
        assert documented, (images.dtype, images.shape)
        assert np.load(out).shape == (images.shape[0],) and lines == []
    else:
        assert not documented, (images.dtype, images.shape, lines)
        assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {src}: got "), lines
        assert str(images.dtype) in lines[0] and str(images.shape) in lines[0], lines[0]
        assert not os.path.exists(out)


# ----------------------------------------------------------------------------- every key, its whole range
# Not a fixed list of bad values: any value of any type, from the edges of each range (huge, tiny, NaN, inf,
# negative, NUL bytes, nested containers), for every key. Issue seen: values that passed validation failed only
# after Ray had started (1e308 as a timeout, 1e-5 CPUs), with a traceback and config.yaml already written.

EDGES = st.sampled_from([0, -0.0, 1, -1, 1e-5, 5e-324, 1e308, -1e308, 2**31, 2**63, 2**64, -(2**63), 10**30,
                         float("nan"), float("inf"), float("-inf"), "", "\0", "a\0b", "x" * 500, " ", "null",
                         "~", "1e309", "0x10", True, False, None, [], {}, [1], {"a": 1}])
ANY_VALUE = st.one_of(
    EDGES, st.integers(), st.floats(), st.text(max_size=20), st.booleans(), st.none(),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
ALL_KEYS = [f"{s}.{k}" for s, k, _ in KEYS]


@settings(max_examples=1500, deadline=None)
@given(key=st.sampled_from(ALL_KEYS), value=ANY_VALUE)
def test_any_value_of_any_key_is_a_config_or_one_short_config_error(key, value):
    """Through the Python API's values (Python objects as they are) and the command line's --set (as YAML)."""
    for attempt in ({"values": {key: value}}, {"overrides": [f"{key}={yaml.safe_dump(value).strip()}"]}):
        try:
            load_config(None, **attempt)
        except ConfigError as e:
            message = str(e)
            assert "\n" not in message and len(message) < 300, (key, value, message[:400])
            assert message.startswith(key) or key.split(".")[0] in message, (key, value, message)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(ALL_KEYS), value=ANY_VALUE)
def test_any_value_the_config_takes_gets_to_ray_or_is_one_line(up_to_ray, tmp_path, key, value):
    """What load_config accepts goes through the real entry point (data, the block check, run.dir) up to where
    Ray would start, or ends in one line and exit 2: never a traceback, whatever the value."""
    if key == "run.dir":
        return  # its own tests: the run directory is the one place the entry point writes
    try:
        load_config(None, values={key: value})
    except ConfigError:
        return  # refused before anything: the test above
    run_dir = tempfile.mkdtemp(dir=tmp_path)
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = run.main(["--set", f"run.dir={run_dir}", "train.epochs=3",
                             f"{key}={yaml.safe_dump(value).strip()}"])
        except WouldStartRay:
            code = None
    _accepted_or_one_line(code, [ln for ln in err.getvalue().splitlines() if ln.strip()])
