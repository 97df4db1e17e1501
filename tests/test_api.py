"""The Python API (noprop_dist.train, load_chain) and the packaged configs (--config NAME), without Ray.

The API's end-to-end run on a real Ray cluster is tests/test_ray.py::test_two_workers_train_assemble_and_...
"""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile

import pytest
from conftest import one_error_line, run_main

import noprop_dist
from noprop_dist import run
from noprop_dist.api import _dotted
from noprop_dist.config import CONFIG_DIR, ConfigError, config_names, load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_packaged_config_loads_by_name_from_any_directory(tmp_path, monkeypatch):
    names = config_names()
    assert {"quickstart", "mnist", "fashion_mnist", "cifar10_ct", "mnist_fm", "mnist_backprop"} <= set(names)
    top = os.path.join(REPO, "configs")  # the project card's configs/: a link to the one copy
    assert os.path.islink(top) and os.path.realpath(top) == os.path.realpath(CONFIG_DIR)
    monkeypatch.chdir(tmp_path)  # no configs/ here

    def load(name):  # each load names a new run directory; the rest must be the same
        cfg = load_config(name)
        assert cfg.run.dir.startswith(os.path.join("runs", os.path.splitext(os.path.basename(name))[0], ""))
        cfg.run.dir = None
        return cfg

    for name in names:
        by_name = load(name)
        assert by_name == load(os.path.join(CONFIG_DIR, name + ".yaml")), name
        assert load(name + ".yaml") == by_name
        assert load(f"configs/{name}.yaml") == by_name  # as commands before the move spelled it
    assert load_config("mnist").data.name == "mnist"


def test_an_unknown_config_name_lists_the_packaged_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    one_error_line(*run_main(run, ["--config", "mnits"])[:2], "mnits", "mnist_ct")
    assert os.listdir(tmp_path) == []


def test_the_wheel_ships_the_configs(tmp_path):
    """An installed (not editable) package must find its configs: they are package data."""
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path), REPO], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    wheel = next(f for f in os.listdir(tmp_path) if f.endswith(".whl"))
    with zipfile.ZipFile(tmp_path / wheel) as z:
        shipped = {n.rsplit("/", 1)[1][:-5] for n in z.namelist() if n.startswith("noprop_dist/configs/")}
    assert shipped == set(config_names())


def test_overrides_as_sections_or_dotted_keys():
    assert _dotted({"train": {"epochs": 3, "lr": 0.01}, "cluster.num_workers": 1}) == {
        "train.epochs": 3, "train.lr": 0.01, "cluster.num_workers": 1}
    cfg = load_config("mnist", values=_dotted({"train": {"epochs": 3}, "model.num_blocks": 4,
                                                "cluster.num_workers": 2}))
    assert (cfg.train.epochs, cfg.model.num_blocks, cfg.data.name) == (3, 4, "mnist")
    # the preset applies before the overrides, and the overrides' method decides its values
    paper = load_config("mnist", preset="paper", values={"train.epochs": 2})
    assert paper.train.epochs == 2 and paper.eval.sampler == "eq3"


@pytest.mark.parametrize("kwargs,names", [
    ({"train": {"epoch": 3}}, ["train.epoch", "unknown key"]),
    ({"train.epochs": "three"}, ["train.epochs"]),
    ({"epochs": 3}, ["epochs=3", "dotted key"]),
    ({"nope": {"x": 1}}, ["nope", "unknown section"]),
    ({"train.lr.x": 1}, ["train.lr.x", "section.name"]),
])
def test_train_refuses_bad_overrides_naming_them_and_writes_nothing(tmp_path, kwargs, names):
    with pytest.raises(ConfigError) as e:
        noprop_dist.train("quickstart", run={"dir": str(tmp_path / "run")}, **kwargs)
    assert all(n in str(e.value) for n in names), str(e.value)
    assert not (tmp_path / "run").exists()


def test_train_takes_a_config_object_and_keeps_its_values(tmp_path):
    cfg = load_config("mnist", values={"train.epochs": 1})
    with pytest.raises(ConfigError, match="cluster.num_workers"):  # validated again, with the overrides
        noprop_dist.train(cfg, cluster={"num_workers": 0})
    with pytest.raises(ConfigError, match="preset"):
        noprop_dist.train(cfg, preset="paper")


def test_load_chain_names_a_run_without_a_chain(tmp_path):
    with pytest.raises(FileNotFoundError, match="no chain.pt"):
        noprop_dist.load_chain(tmp_path)
