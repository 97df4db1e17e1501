"""What a user hands the entry points that used to end in a traceback (or, worse, a wrong answer): a config
file that is not UTF-8 or not a mapping, values too large for torch or Ray, a run.dir it may not write, and
images for ``--predict`` that are not what the chain takes. Each must end as one ``error: ...`` line naming
the key, file or array and what is expected, exit code 2, and nothing written to run.dir."""
from __future__ import annotations

import errno
import os

import numpy as np
import pytest
import torch
from conftest import one_error_line, run_main

from noprop_dist import evaluate, run
from noprop_dist.config import MAX_TRAIN_SEED, load_config
from noprop_dist.core import seeds

# ----------------------------------------------------------------------------- config files and values

@pytest.mark.parametrize("content", [b"\xff\xfe\x00model: 1", b"- a\n- list\n", b"just a string\n", b"42\n",
                                     b"train:\n  seed: 2020-13-45\n"])
def test_a_config_file_that_is_not_a_utf8_yaml_mapping_isone_error_line(tmp_path, content):
    """Guards: a non-UTF-8 --config file raised UnicodeDecodeError (a traceback); a timestamp PyYAML cannot
    build raised ValueError; a list or scalar must be refused naming the file."""
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    run_dir = tmp_path / "run"
    code, lines, _ = run_main(run, ["--config", str(path), "--set", f"run.dir={run_dir}"])
    one_error_line(code, lines, str(path))
    if content.startswith(b"\xff"):
        assert "not UTF-8" in lines[0]
    assert not run_dir.exists()


@pytest.mark.parametrize("override, key, bound", [
    ("model.num_blocks=1000000000", "model.num_blocks", "1000"),
    ("model.num_blocks=1.0e+9", "model.num_blocks", "1000"),
    ("model.num_shards=100000", "model.num_shards", "1000"),
    ("model.embedding_dim=10000000", "model.embedding_dim", "65536"),
    ("model.inference_steps=1000000000000", "model.inference_steps", "100000"),
    ("train.batch_size=1000000000000", "train.batch_size", str(1 << 20)),
    ("eval.batch_size=100000000000000000000", "eval.batch_size", str(1 << 20)),
    ("cluster.num_workers=5000", "cluster.num_workers", "1000"),
    ("cluster.threads_per_worker=4294967296", "cluster.threads_per_worker", "1024"),
    ("cluster.cpus_per_worker=1e12", "cluster.cpus_per_worker", "1024"),
    ("cluster.max_restarts=100000000000000000000", "cluster.max_restarts", "1000"),
    ("eval.seed=18446744073709551616", "eval.seed", "18446744073709551615"),
    ("eval.seed=-9223372036854775809", "eval.seed", "-9223372036854775808"),
    ("train.seed=18446744073709551616", "train.seed", str(MAX_TRAIN_SEED)),
    ("train.seed=4294967296", "train.seed", str(MAX_TRAIN_SEED)),
])
def test_values_too_large_for_torch_or_ray_are_refused_before_anything_starts(tmp_path, override, key, bound):
    """Guards: these passed validation and failed only after Ray had started (or at the final evaluation):
    torch's manual_seed overflows past 2**64 - 1, set_num_threads past a C int, a billion blocks never fit."""
    run_dir = tmp_path / "run"
    args = ["--set", f"run.dir={run_dir}", override]
    if key == "model.num_shards":
        args.append("model.method=noprop_ct")
    code, lines, _ = run_main(run, args)
    one_error_line(code, lines, key, bound)
    assert not run_dir.exists()


def test_the_largest_allowed_seeds_seed_torch():
    """The bounds are not too tight: the largest seeds pass validation and every seed derived from them
    (the training's largest multiplier and offsets) is one torch takes."""
    cfg = load_config(None, [f"train.seed={MAX_TRAIN_SEED}", f"eval.seed={2**64 - 1}", "model.num_blocks=1000",
                             "cluster.num_workers=1000"])
    torch.Generator().manual_seed(cfg.eval.seed)
    seed, epoch, last = cfg.train.seed, 10**6, 1_000
    for derived in (seeds.shard_init_seed(seed, last, True), seeds.shared_init_seed(seed), seeds.dtp_init_seed(seed),
                    seeds.block_noise_seed(seed, last), seeds.epoch_order_seed(seed, epoch),
                    seeds.global_rng_seed(seed, epoch, last), seeds.baseline_noise_seed(seed, epoch, last)):
        torch.Generator().manual_seed(derived)


# ----------------------------------------------------------------------------- run.dir permissions

@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through any permission bits")
def test_a_run_dir_below_a_read_only_directory_isone_error_line(tmp_path):
    """Guards: permission denied on run.dir surfaced only once Ray had started (or as a traceback)."""
    parent = tmp_path / "parent"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        code, lines, _ = run_main(run, ["--set", f"run.dir={parent / 'run'}"])
        one_error_line(code, lines, str(parent), "permission denied")
        assert not (parent / "run").exists()
    finally:
        parent.chmod(0o700)


def test_a_run_dir_this_process_may_not_write_is_refused_before_ray_starts(tmp_path, monkeypatch):
    """Guards: the same refusal where the test runs as root (whom chmod does not stop): the kernel's answer
    is simulated for the run.dir's parent only, and the refusal must come before Ray is started."""
    from noprop_dist.distributed import driver

    parent = tmp_path / "parent"
    parent.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if os.fspath(p) == str(parent)
                        else real_access(p, mode, **kw))
    monkeypatch.setattr(driver, "_connect_checked", lambda cfg: pytest.fail("Ray was started"))
    code, lines, _ = run_main(run, ["--set", f"run.dir={parent / 'run'}"])
    one_error_line(code, lines, str(parent), "permission denied")
    assert os.listdir(parent) == []


def test_an_os_error_on_a_path_is_one_line_naming_it(tmp_path, monkeypatch):
    """Guards: an OSError about a file (permission denied writing config.yaml, a full disk) was a traceback;
    one without a path is a bug and keeps its traceback."""
    from noprop_dist.distributed import driver

    path = str(tmp_path / "run" / "config.yaml")

    def denied(cfg, log=print, *rest):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(driver, "run_training", denied)
    code, lines, _ = run_main(run, ["--set", f"run.dir={tmp_path / 'run'}"])
    one_error_line(code, lines, path, "Permission denied")

    def full(cfg, log=print, *rest):  # what write() raises on a full disk: an errno, no file name
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(driver, "run_training", full)
    code, lines, _ = run_main(run, ["--set", f"run.dir={tmp_path / 'run'}"])
    one_error_line(code, lines, str(tmp_path / "run"), "No space left on device")

    def pathless(cfg, log=print, *rest):
        raise OSError("no path here")

    monkeypatch.setattr(driver, "run_training", pathless)
    with pytest.raises(OSError, match="no path here"):
        run.main(["--set", f"run.dir={tmp_path / 'run'}"])


# ----------------------------------------------------------------------------- --predict inputs

@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A run directory holding a chain trained briefly in process on digits (well above chance), saved with
    the extra keys the driver writes; and the digits test images and labels."""
    from noprop_dist.data import load_dataset
    from noprop_dist.training import evaluate_states, model_spec, train_in_process

    cfg = load_config(None, ["model.num_blocks=3", "train.epochs=3", "cluster.num_workers=1"])
    ds = load_dataset("digits")
    blocks, shared, _ = train_in_process(cfg, ds, device="cpu")
    chain, acc = evaluate_states(model_spec(cfg, ds.image_shape, ds.num_classes), ds, blocks, shared, 1000, 1234)
    run_dir = tmp_path_factory.mktemp("trained_run")
    chain.save(str(run_dir / "chain.pt"), extra={"dataset": "digits", "data_root": None, "test_limit": None,
                                                 "mean": list(ds.mean), "std": list(ds.std), "test_accuracy": acc,
                                                 "eval_seed": 1234, "eval_batch_size": 1000})
    return str(run_dir), ds.test_x, ds.test_y


def test_float_images_in_0_1_give_the_predictions_of_the_same_uint8_images(trained_run):
    """Guards: float images in [0, 1] were normalised as if they were 0..255 and predicted at chance (12 %
    where the uint8 images gave 94 %), exit 0; (N, H, W) for a one-channel chain is the same images too."""
    run_dir, x, y = trained_run
    as_uint8 = evaluate.predict(run_dir, x)
    assert (as_uint8 == y).mean() > 0.3  # chance is 0.1: the comparison below is between real predictions
    for floats in (x.astype(np.float32) / 255, x.astype(np.float64) / 255, x[:, 0].astype(np.float32) / 255):
        np.testing.assert_array_equal(evaluate.predict(run_dir, floats), as_uint8)
    np.testing.assert_array_equal(evaluate.predict(run_dir, x[:, 0]), as_uint8)


@pytest.mark.parametrize("images, problem", [
    (np.zeros((4, 8, 8, 1), np.uint8), "shape"),  # channels last
    (np.zeros((4, 3, 8, 8), np.uint8), "shape"),  # three channels for a one-channel chain
    (np.zeros((4, 1, 28, 28), np.uint8), "shape"),  # another image size
    (np.zeros((64,), np.uint8), "shape"),
    (np.zeros((2, 4, 1, 8, 8), np.uint8), "shape"),
    (np.full((4, 1, 8, 8), 255.0, np.float32), "not in [0, 1]"),  # floats 0..255
    (np.full((4, 1, 8, 8), -0.5), "not in [0, 1]"),
    (np.full((4, 1, 8, 8), np.nan, np.float32), "NaN"),
    (np.zeros((4, 1, 8, 8), np.int64), "int64"),
    (np.zeros((4, 1, 8, 8), bool), "bool"),
    (np.full((4, 1, 8, 8), "a"), "<U1"),
])
def test_predict_refuses_what_it_does_not_document(trained_run, images, problem):
    """Guards: predict() accepted any array and returned predictions (or a torch traceback) for it."""
    run_dir, _, _ = trained_run
    with pytest.raises(ValueError) as e:
        evaluate.predict(run_dir, images, source="imgs.npy")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("imgs.npy: got ") and problem in msg, msg
    assert str(images.dtype) in msg and str(images.shape) in msg and "(N, 1, 8, 8)" in msg, msg


def test_the_predict_cli_takes_floats_and_refuses_bad_files_inone_error_line(trained_run, tmp_path):
    """Guards: --predict loaded with pickles allowed (a planted .npy could run code) and wrote predictions
    for any array; now a float file gives the uint8 predictions and bad files are one line, exit 2, no output."""
    run_dir, x, _ = trained_run
    out = tmp_path / "preds.npy"
    np.save(tmp_path / "u8.npy", x)
    np.save(tmp_path / "f.npy", x / 255.0)
    assert run_main(evaluate, [run_dir, "--predict", str(tmp_path / "u8.npy"), "--out", str(out)])[0] == 0
    want = np.load(out)
    assert run_main(evaluate, [run_dir, "--predict", str(tmp_path / "f.npy"), "--out", str(out)])[0] == 0
    np.testing.assert_array_equal(np.load(out), want)
    os.remove(out)

    marker = tmp_path / "pwned"

    class Planted:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    np.save(tmp_path / "planted.npy", np.array([Planted()], dtype=object), allow_pickle=True)
    (tmp_path / "junk.npy").write_bytes(b"\x93NUMPY\x01\x00 not a header")
    (tmp_path / "empty.npy").write_bytes(b"")
    np.savez(tmp_path / "archive.npz", images=x)
    np.save(tmp_path / "ints.npy", x.astype(np.int64))
    for name, says in [("planted.npy", "pickle"), ("junk.npy", "not a readable .npy"),
                       ("empty.npy", "not a readable .npy"), ("archive.npz", "not one .npy array"),
                       ("ints.npy", "int64")]:
        code, lines, _ = run_main(evaluate, [run_dir, "--predict", str(tmp_path / name), "--out", str(out)])
        one_error_line(code, lines, str(tmp_path / name), says)
        assert not out.exists(), name
    assert not marker.exists(), "loading the .npy ran its pickle"
    code, lines, _ = run_main(evaluate, [run_dir, "--predict", str(tmp_path / "u8.npy"), "--seed", str(2**64)])
    one_error_line(code, lines, "seed")


def test_a_predict_output_that_cannot_be_written_isone_error_line(trained_run, tmp_path):
    """Guards: --out in a directory that does not exist or may not be written ended in a traceback."""
    run_dir, x, _ = trained_run
    np.save(tmp_path / "u8.npy", x[:3])
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code, lines, _ = run_main(evaluate, [run_dir, "--predict", str(tmp_path / "u8.npy"), "--out",
                                      str(blocker / "preds.npy")])
    one_error_line(code, lines, str(blocker / "preds.npy"))


def test_an_empty_batch_predicts_nothing(trained_run):
    """N = 0 is a valid batch: zero predictions, not an error from the network."""
    run_dir, _, _ = trained_run
    assert evaluate.predict(run_dir, np.zeros((0, 1, 8, 8), np.uint8)).shape == (0,)
    assert evaluate.predict(run_dir, np.zeros((0, 8, 8), np.float32)).shape == (0,)

