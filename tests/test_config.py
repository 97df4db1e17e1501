"""Config loading: defaults, YAML, --set overrides, and errors that name the key."""
from dataclasses import MISSING, fields

import pytest

from noprop_dist.config import (
    ClusterConfig,
    Config,
    ConfigError,
    DataConfig,
    RunConfig,
    config_file,
    config_from_dict,
    load_config,
)


def test_defaults_are_the_quickstart():
    cfg = load_config()
    assert (cfg.data.name, cfg.model.num_blocks, cfg.cluster.num_workers) == ("digits", 10, 2)
    packaged = load_config("noprop_dist/configs/quickstart.yaml")
    for c in (cfg, packaged):  # each a new run directory of its own, named after the quickstart
        assert c.run.dir.startswith("runs/quickstart/")
        c.run.dir = None
    assert packaged.to_dict() == cfg.to_dict()


def test_each_section_checks_its_own_keys_and_config_the_rules_across_sections():
    """A section validates alone (data.load_dataset checks a DataConfig by itself); a rule that joins two sections
    is Config.validate's, and its message names both keys."""
    with pytest.raises(ConfigError, match="^data.name: 'imagenet' is not allowed; allowed: digits"):
        DataConfig(name="imagenet").validate()
    cfg = Config(run=RunConfig(dir="x"), cluster=ClusterConfig(num_workers=11))
    for section in fields(cfg):
        getattr(cfg, section.name).validate()  # 11 workers: a cluster of its own, whatever the model
    with pytest.raises(ConfigError, match=r"^cluster.num_workers: must be in \[1, model.num_blocks = 10\]"):
        cfg.validate()


def test_model_spec_defaults_are_the_configs():
    """ModelSpec's optional fields default to what the default config trains (they said snr_prime, head, velocity
    and the paper's sampler where the config says flat, nearest, endpoint and mean)."""
    from noprop_dist.core import ModelSpec
    from noprop_dist.training.spec import model_spec

    configured = model_spec(Config(), (1, 8, 8), 10)
    required = {f.name: getattr(configured, f.name) for f in fields(ModelSpec)
                if f.default is MISSING and f.default_factory is MISSING}
    assert ModelSpec(**required) == configured


def test_overrides_parse_yaml_values():
    cfg = load_config(None, ["train.epochs=3", "cluster.gpus_per_worker=0.5", "data.root=null",
                             "data.download=true", "run.dir=/x/y"])
    assert cfg.train.epochs == 3 and cfg.cluster.gpus_per_worker == 0.5
    assert cfg.data.root is None and cfg.data.download is True and cfg.run.dir == "/x/y"


def test_round_trip_through_dict():
    cfg = load_config(None, ["model.embedding=one_hot"])
    assert config_from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()


@pytest.mark.parametrize("override,names", [
    ("train.epoch=3", ["train.epoch", "unknown key", "epochs"]),
    ("trian.epochs=3", ["trian", "unknown section", "train"]),
    ("train.epochs=three", ["train.epochs", "number"]),
    ("train.epochs=inf", ["train.epochs", "finite"]),
    ("train.epochs=0", ["train.epochs", "> 0"]),
    ("train.lr=-1", ["train.lr", "> 0"]),
    ("train.lr=nan", ["train.lr", "finite"]),
    ("model.embedding=onehot", ["model.embedding", "one_hot, learned, prototype"]),
    ("model.class_prob=sigmoid", ["model.class_prob", "softmax, radial"]),
    ("data.name=imagenet", ["data.name", "digits", "cifar100"]),
    ("train.sync_mode=maybe", ["train.sync_mode", "sync, async"]),
    ("cluster.num_workers=11", ["cluster.num_workers", "model.num_blocks = 10"]),
    ("cluster.num_workers=0", ["cluster.num_workers"]),
    ("cluster.gpus_per_worker=-0.5", ["cluster.gpus_per_worker", ">= 0"]),
    ("cluster.gpus_per_worker=1.5", ["cluster.gpus_per_worker", "whole number"]),
    ("data.download=perhaps", ["data.download", "true or false"]),
    ("model.abar_max=1.0", ["model.abar_max", "(0.5, 0.9999]"]),
    ("train.epochs", ["KEY=VALUE"]),
    ("epochs=3", ["section.name"]),
])
def test_bad_values_name_the_key_and_allowed_values(override, names):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    msg = str(e.value)
    assert "\n" not in msg
    for name in names:
        assert name in msg, (name, msg)


def test_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("train: 3\n")
    with pytest.raises(ConfigError, match="train: must be a mapping"):
        load_config(str(scalar))
    with pytest.raises(ConfigError, match="file not found"):
        load_config(str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize("override,names", [
    ("metrics.enabled=perhaps", ["metrics.enabled", "true or false"]),
    ("metrics.run_id=my run", ["metrics.run_id", "letters, digits"]),
    ("metrics.run_id=-x", ["metrics.run_id"]),
    ("metrics.write_every_seconds=0", ["metrics.write_every_seconds", "> 0"]),
    ("metrics.port=8080", ["metrics.port", "unknown key", "enabled, run_id, write_every_seconds"]),
])
def test_metrics_keys_name_the_key(override, names):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    for name in names:
        assert name in str(e.value), (name, str(e.value))


def test_metrics_defaults_and_overrides():
    cfg = load_config()
    assert (cfg.metrics.enabled, cfg.metrics.run_id, cfg.metrics.write_every_seconds) == (True, None, 5.0)
    cfg = load_config(None, ["metrics.enabled=false", "metrics.run_id=fmnist-w10.a", "metrics.write_every_seconds=1"])
    assert (cfg.metrics.enabled, cfg.metrics.run_id, cfg.metrics.write_every_seconds) == (False, "fmnist-w10.a", 1.0)


def test_paper_preset_restores_the_papers_settings_and_set_still_wins():
    """noprop_dist/configs/*_ct.yaml depart from the paper where measured better; --preset paper puts Table 3 back."""

    ct = config_file("cifar10_ct")
    ours = load_config(ct)
    assert (ours.model.ct_loss_weight, ours.model.image_batch_norm, ours.train.lr_schedule) == ("flat", True, "cosine")
    paper = load_config(ct, ["model.num_shards=2", "cluster.num_workers=2", "train.epochs=3"], "paper")
    assert (paper.model.ct_loss_weight, paper.model.image_batch_norm, paper.train.lr_schedule) == \
        ("snr_prime", False, "constant")
    assert (paper.model.dropout, paper.model.eta, paper.model.inference_steps, paper.eval.sampler) == \
        (0.2, 1.0, 1000, "eq3")
    assert paper.model.num_shards == 2 and paper.train.epochs == 3  # distribution and --set stay the user's
    assert load_config(ct, [], "paper").train.epochs == 500  # Table 3: CT on CIFAR-10
    dt = load_config(None, ["data.name=cifar100"], "paper")
    assert (dt.train.epochs, dt.model.eta, dt.model.num_blocks, dt.eval.sampler) == (150, 0.1, 10, "eq3")
    fashion = config_file("fashion_mnist")  # evaluates with stage_average; the paper's preset runs Eq. 3
    assert (load_config(fashion).eval.sampler, load_config(fashion, [], "paper").eval.sampler) == \
        ("stage_average", "eq3")
    with pytest.raises(ConfigError, match="--preset: 'fast' is not allowed; allowed: paper"):
        load_config(None, [], "fast")


def test_each_fixed_set_of_values_is_written_once_as_a_literal_type():
    """The tuples validation allows come from the Literal types the config's fields carry (model.method's from
    registry.METHODS)."""
    from typing import get_args, get_type_hints

    from noprop_dist import config as C

    assert tuple(C.SAMPLERS) == get_args(C.Sampler)
    hints = get_type_hints(C.ModelConfig)
    assert get_args(hints["embedding"]) == C.EMBEDDINGS
    assert get_args(get_type_hints(C.EvalConfig)["sampler"]) == tuple(C.SAMPLERS)
    with pytest.raises(ConfigError, match="model.method: 'sgd' is not allowed; allowed: noprop_dt, noprop_ct"):
        load_config(None, ["model.method=sgd"])


@pytest.mark.parametrize("given,epochs,passes,batches", [
    ("2", 2, 2, [10, 10]), ("2.0", 2, 2, [10, 10]), ("0.5", 0.5, 1, [5]), ("2.25", 2.25, 3, [10, 10, 2]),
    ("0.01", 0.01, 1, [1]),  # a sliver of an epoch still trains one batch
])
def test_a_fractional_budget_trains_part_of_the_last_epoch(given, epochs, passes, batches):
    """train.epochs takes a fraction: the epochs begun (passes) round it up, and the last one trains its share
    of the batches (here 10 per epoch). A whole number stays an int, so snapshots and tables say 2, not 2.0."""
    t = load_config(None, [f"train.epochs={given}"]).train
    assert t.epochs == epochs and type(t.epochs) is type(epochs)
    assert t.passes == passes
    assert [t.batches_in(e, 10) for e in range(t.passes)] == batches


def test_a_yaml_file_that_repeats_a_key_is_refused_naming_it(tmp_path):
    """PyYAML keeps the last of two equal keys: `epochs: 3` then `epochs: 5` silently trained 5."""
    path = tmp_path / "dup.yaml"
    path.write_text("train:\n  epochs: 3\n  epochs: 5\n")
    with pytest.raises(ConfigError, match=r"not valid YAML \(duplicate key 'epochs'\)"):
        load_config(str(path))


def test_an_error_line_stays_short_whatever_the_value(tmp_path):
    """A 300-byte YAML alias bomb expands into megabytes of repr: the message quoted all of it. Unknown keys name
    the nearest ones instead of listing a long section."""
    bomb = tmp_path / "bomb.yaml"  # each level nine times the last: 9^6 strings in a 400-byte file
    bomb.write_text("model:\n  dropout:\n    - " + "\n    - ".join(
        ["&a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"] + [f"&{n} [{', '.join([f'*{p}'] * 9)}]"
                                                             for p, n in zip("abcde", "bcdef")]) + "\n")
    for path, over in ((str(bomb), []), (None, [f"model.{'x' * 10_000}=1"]), (None, ["model.dropuot=0.1"]),
                       (None, [f"model.block={'x' * 10_000}"]), (None, [f"metrics.run_id={'x' * 10_000} y"])):
        with pytest.raises(ConfigError) as e:
            load_config(path, over)
        assert len(str(e.value)) < 300 and "\n" not in str(e.value), str(e.value)[:500]
    with pytest.raises(ConfigError, match="model.dropuot: unknown key; did you mean dropout"):
        load_config(None, ["model.dropuot=0.1"])


@pytest.mark.parametrize("override,needle", [
    ("cluster.placement_timeout_s=1e308", "cluster.placement_timeout_s: must be in [0, 604800.0]"),
    ("cluster.hang_timeout_s=1e308", "cluster.hang_timeout_s: must be in [0, 604800.0]"),
    ("cluster.cpus_per_worker=0.00001", "cluster.cpus_per_worker: must be in [0.0001, 1024]"),
    ("cluster.gpus_per_worker=0.00005", "cluster.gpus_per_worker: 0, or at least 0.0001"),
    ("eval.ensemble_draws=100000", "eval.ensemble_draws: must be in [1, 1000]"),
])
def test_values_ray_would_refuse_after_it_started_are_refused_before(override, needle):
    """Each passed validation and then failed inside Ray or the final evaluation, with a traceback and
    config.yaml already written."""
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value).startswith(needle), str(e.value)
