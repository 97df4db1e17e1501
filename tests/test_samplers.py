"""Inference samplers of the NoProp chains (eq3, mean, ensemble, stage_average, ode), the order of the DT chain's
blocks, and the accuracy along the chain (evaluate_stages)."""
import math

import pytest
import torch
from conftest import make_spec
from torch import nn

from noprop_dist.config import SAMPLERS, ConfigError, load_config
from noprop_dist.core import DTChain, build_shared, evaluate_stages, mean_probabilities
from noprop_dist.core.blocks import ModelSpec
from noprop_dist.registry import METHODS
from noprop_dist.training import model_spec


class ConstantBlock(nn.Module):
    """A DT block that predicts class ``c`` whatever it sees, and records the z it was given."""

    def __init__(self, c: int, num_classes: int = 10) -> None:
        super().__init__()
        self.c, self.num_classes, self.seen = c, num_classes, []

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(z.clone())
        logits = torch.full((z.shape[0], self.num_classes), -30.0)
        logits[:, self.c] = 30.0
        return logits


def _constant_chain(T: int = 4) -> DTChain:
    """Block t predicts class t - 1: a chain whose every step can be written down by hand."""
    spec = make_spec("learned", num_shards=T)
    return DTChain(spec, [ConstantBlock(t - 1) for t in range(1, T + 1)], build_shared(spec, 0)).eval()


def _assert_runs_in_order(chain: DTChain) -> None:
    """Block t sees z_{t-1} and steps with (a_t, b_t): the noise-free (mean) chain written by hand."""
    x = torch.randn(6, 1, 8, 8)
    trace = []
    out = chain(x, torch.Generator().manual_seed(0), sampler="mean", trace=trace)
    embed = chain.shared.embed.detach()
    z = torch.randn(6, embed.shape[1], generator=torch.Generator().manual_seed(0))
    for t in range(1, chain.spec.num_shards + 1):
        block = chain.blocks[t - 1]
        assert block.c == t - 1, f"position {t} holds the block trained as block {block.c + 1}"
        assert torch.allclose(block.seen[-1], z, atol=1e-6), f"block {t} must see z_{t - 1}"
        a, b, _ = chain.schedule.posterior_coefficients(t)
        z = a * embed[t - 1] + b * z
    assert torch.allclose(out, torch.log_softmax(chain.shared.head(z), dim=1), atol=1e-5)
    assert [int(own.argmax(1)[0]) for _, own in trace] == list(range(chain.spec.num_shards)), "stage t is block t"


def test_dt_chain_runs_its_blocks_in_order_one_to_T():
    """Pitfall: block t was trained at z_{t-1}'s noise level, so the chain must run block 1 first, on z_0, and
    step with block t's coefficients. A reversed chain of trained blocks still scores well (each block reads
    the image), so accuracy cannot catch it; blocks with known outputs can."""
    _assert_runs_in_order(_constant_chain(4))


def test_reversed_dt_chain_is_caught():
    """The order check has power: it fails on a chain holding its blocks backwards."""
    chain = _constant_chain(4)
    chain.blocks = nn.ModuleList(list(chain.blocks)[::-1])
    with pytest.raises(AssertionError):
        _assert_runs_in_order(chain)


def test_mean_sampler_leaves_out_only_the_noise_term():
    """eq3 adds sqrt(c_t) eps_t at every step, drawn after z_0 from the same generator; mean adds nothing.
    Their difference after block 1 is exactly sqrt(c_1) eps_1."""
    chain = _constant_chain(3)
    x = torch.randn(5, 1, 8, 8)
    t_eq3, t_mean = [], []
    chain(x, torch.Generator().manual_seed(2), sampler="eq3", trace=t_eq3)
    chain(x, torch.Generator().manual_seed(2), sampler="mean", trace=t_mean)
    g = torch.Generator().manual_seed(2)
    torch.randn(5, chain.spec.embed_dim, generator=g)  # z_0
    eps_1 = torch.randn(5, chain.spec.embed_dim, generator=g)
    c_1 = chain.schedule.posterior_coefficients(1)[2]
    z1_eq3, z1_mean = chain.blocks[1].seen[0], chain.blocks[1].seen[1]
    assert torch.allclose(z1_eq3 - z1_mean, math.sqrt(c_1) * eps_1, atol=1e-6)


def test_ensemble_averages_class_probabilities_of_consecutive_noisy_runs():
    chain = _constant_chain(3)
    with torch.no_grad():
        chain.shared.head.weight.normal_(0, 3.0, generator=torch.Generator().manual_seed(0))
    x = torch.randn(4, 1, 8, 8)
    out = chain(x, torch.Generator().manual_seed(9), sampler="ensemble", draws=3)
    g = torch.Generator().manual_seed(9)
    runs = [chain(x, g, sampler="eq3") for _ in range(3)]
    ref = torch.log(torch.stack([r.exp() for r in runs]).mean(0))
    assert torch.allclose(out, ref, atol=1e-5)
    assert torch.allclose(out, mean_probabilities(runs), atol=1e-6)
    assert torch.allclose(out.exp().sum(1), torch.ones(4), atol=1e-5)
    assert not torch.allclose(out, runs[0], atol=1e-3), "three different noisy runs were averaged"


def test_stage_average_averages_the_head_over_every_stage_of_one_mean_run():
    """stage_average runs the chain once without noise and averages the head's class probabilities at z_1 .. z_T;
    its trace is that run's. Reading out z_T alone (mean) or z_{T-1} alone must differ from it here."""
    chain = _constant_chain(3)
    with torch.no_grad():
        chain.shared.head.weight.normal_(0, 3.0, generator=torch.Generator().manual_seed(0))
    x = torch.randn(4, 1, 8, 8)
    t_avg, t_mean = [], []
    out = chain(x, torch.Generator().manual_seed(5), sampler="stage_average", trace=t_avg)
    mean = chain(x, torch.Generator().manual_seed(5), sampler="mean", trace=t_mean)
    assert len(t_avg) == len(t_mean) == 3
    for (r_avg, o_avg), (r_mean, o_mean) in zip(t_avg, t_mean):
        assert torch.equal(r_avg, r_mean) and torch.equal(o_avg, o_mean)
    by_hand = torch.log(torch.stack([readout.exp() for readout, _ in t_mean]).mean(0))
    assert torch.allclose(out, by_hand, atol=1e-5)
    assert torch.allclose(out.exp().sum(1), torch.ones(4), atol=1e-5)
    for single in (mean, t_mean[-2][0]):
        assert not torch.allclose(out, single, atol=1e-3), "the read-outs of all stages were averaged"


def test_spec_sampler_is_the_default_and_old_chains_run_the_papers():
    chain = _constant_chain(2)
    assert chain.spec.sampler is None and chain.sampler_name() == "eq3"  # a chain saved before samplers
    from dataclasses import replace

    chain.spec = replace(chain.spec, sampler="mean")
    assert chain.sampler_name() == "mean"
    with pytest.raises(ValueError, match="sampler 'ode' does not apply to a noprop_dt chain; allowed: eq3, mean, "
                                         "ensemble, stage_average$"):
        chain(torch.randn(2, 1, 8, 8), sampler="ode")
    with pytest.raises(ValueError, match="steps does not apply to a noprop_dt chain$"):  # it runs its T blocks
        chain(torch.randn(2, 1, 8, 8), steps=5)
    old = dict(make_spec("learned").to_dict(), method="noprop_ct", ct_inference="chain")
    old.pop("sampler")
    assert ModelSpec.from_dict(old).sampler == "eq3"


def test_config_sampler_reaches_the_spec_and_is_checked_per_method():
    cfg = load_config(None, ["eval.sampler=ensemble", "eval.ensemble_draws=4"])
    spec = model_spec(cfg, (1, 8, 8), 10)
    assert (spec.sampler, spec.ensemble_draws) == ("ensemble", 4)
    assert load_config(None, []).eval.sampler == "mean"
    assert load_config(None, ["model.method=noprop_ct", "model.num_shards=2",
                                    "model.ct_inference=chain"]).eval.sampler == "eq3"
    for method, bad in (("noprop_dt", "ode"), ("noprop_fm", "eq3"), ("noprop_fm", "ode"),
                        ("noprop_ct", "stage_average"), ("noprop_fm", "stage_average")):
        with pytest.raises(ConfigError, match=f"eval.sampler: '{bad}' does not apply to model.method={method}"):
            load_config(None, [f"model.method={method}", "model.num_shards=2", f"eval.sampler={bad}"])
    with pytest.raises(ConfigError, match="eval.sampler: 'noisy' is not allowed; allowed: eq3, mean, ensemble, "
                                         "stage_average, ode"):
        load_config(None, ["eval.sampler=noisy"])
    for method in METHODS.values():  # a NoProp method runs samplers of the config's, in its order, the paper's too
        assert list(method.samplers) == [s for s in SAMPLERS if s in method.samplers]
        assert (method.paper_sampler in method.samplers) == method.noprop == bool(method.samplers)
        if method.noprop:  # its chain class registers a sampler (core.samplers) for each name, and no other
            assert set(method.chain.samplers) == set(method.samplers), method.name


def test_evaluate_stages_scores_each_stage_and_matches_evaluate_chain():
    """Stage t's own accuracy is the share of labels equal to block t's constant class; the chain's last stage
    is the chain's output; predictions equal evaluate_chain's for the same seed."""
    from noprop_dist.core import evaluate_chain

    chain = _constant_chain(3)
    images = torch.randint(0, 256, (50, 1, 8, 8), dtype=torch.uint8)
    labels = torch.arange(50) % 5
    norm = lambda b: b.float() / 255  # noqa: E731
    acc, preds, stages = evaluate_stages(chain, images, labels, 16, 3, norm, "cpu", sampler="mean")
    ref_acc, ref_preds = evaluate_chain(chain, images, labels, 16, 3, norm, "cpu", sampler="mean")
    assert torch.equal(preds, ref_preds) and acc == ref_acc
    all_but_one = preds.clone()
    all_but_one[0] = (all_but_one[0] + 1) % 10
    # a count over n, exactly (a float32 mean gives 0.98000002 and misses a 0.98 target)
    assert evaluate_chain(chain, images, all_but_one, 16, 3, norm, "cpu", sampler="mean")[0] == 49 / 50
    assert [s["own_accuracy"] for s in stages] == [pytest.approx(0.2)] * 3  # classes 0, 1, 2: 10 of 50 each
    assert stages[-1]["chain_accuracy"] == pytest.approx(acc)


def test_final_evaluation_of_a_stage_average_run_reports_mean_and_the_papers_beside_it():
    """A run with stage_average reports eq3 (the paper's) and mean (read from its last stage) beside its own.
    Block t always predicts class t - 1 and the head reads z against the embeddings, so the stages differ."""
    from noprop_dist.core import build_block, evaluate_chain
    from noprop_dist.data import load_dataset, normalize
    from noprop_dist.training.evaluation import assemble_chain, final_evaluation

    ds = load_dataset("digits", test_limit=80)
    spec = model_spec(load_config(None, ["model.num_blocks=3", "eval.sampler=stage_average"]), ds.image_shape, 10)
    blocks = {}
    for t in (1, 2, 3):
        block = build_block(spec, t, 0)
        with torch.no_grad():
            block.fuse[-1].weight.zero_()
            block.fuse[-1].bias.fill_(-30.0)
            block.fuse[-1].bias[t - 1] = 30.0
        blocks[t] = {"block": block.state_dict()}  # the checkpoint's form
    shared = build_shared(spec, 0)
    with torch.no_grad():
        shared.head.weight.copy_(30 * shared.embed)
        shared.head.bias.zero_()
    chain = assemble_chain(spec, blocks, {"shared": shared.state_dict()})
    out = final_evaluation(chain, ds, 32, 7)  # one pass: the paper's sampler, a pass of its own, only when asked
    assert set(out["test_accuracy_by_sampler"]) == {"stage_average", "mean"}
    out = final_evaluation(chain, ds, 32, 7, paper_sampler=True)
    by = out["test_accuracy_by_sampler"]
    assert out["sampler"] == "stage_average" and set(by) == {"stage_average", "eq3", "mean"}
    assert out["stages"][0]["chain_accuracy"] != out["stages"][-1]["chain_accuracy"], "stages must differ"
    mean, _ = evaluate_chain(chain, torch.from_numpy(ds.test_x), torch.from_numpy(ds.test_y), 32, 7,
                             lambda b: normalize(b, ds.mean, ds.std), sampler="mean")
    assert by["mean"] == pytest.approx(mean)


def _saved_dt_run(tmp_path) -> str:
    """A run directory holding an untrained 3-block DT chain for the digits (no training: the CLI is tested)."""
    from noprop_dist.core import build_block
    from noprop_dist.data import load_dataset

    ds = load_dataset("digits", test_limit=60)
    spec = make_spec("learned", num_shards=3)
    spec = ModelSpec.from_dict(spec.to_dict() | {"sampler": "mean"})
    chain = DTChain(spec, [build_block(spec, t, 0) for t in (1, 2, 3)], build_shared(spec, 0)).eval()
    chain.save(str(tmp_path / "chain.pt"), extra={
        "dataset": "digits", "data_root": None, "test_limit": 60, "mean": list(ds.mean), "std": list(ds.std),
        "test_accuracy": 0.0, "eval_seed": 1234, "eval_batch_size": 25})
    return str(tmp_path)


def test_evaluate_cli_runs_every_dt_sampler_and_refuses_what_does_not_apply(tmp_path, capsys):
    import json

    from noprop_dist.evaluate import main as evaluate_main

    run = _saved_dt_run(tmp_path)
    assert evaluate_main([run]) == 0
    assert json.loads(capsys.readouterr().out)["sampler"] == "mean"  # the run's own
    assert evaluate_main([run, "--sampler", "ensemble", "--draws", "2", "--stages"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["sampler"] == "ensemble" and out["draws"] == 2 and len(out["stages"]) == 3
    assert out["stages"][-1]["chain_accuracy"] == pytest.approx(out["test_accuracy"])
    assert evaluate_main([run, "--sampler", "stage_average", "--stages"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["sampler"] == "stage_average" and len(out["stages"]) == 3
    for argv, message in (([run, "--sampler", "ode"], "sampler 'ode' does not apply to a noprop_dt chain"),
                          ([run, "--draws", "3"], "--draws applies to the ensemble sampler"),
                          ([run, "--steps", "10"], "--steps applies to noprop_ct / noprop_fm chains")):
        assert evaluate_main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("method,sampler", [("noprop_dt", "stage_average"), ("noprop_dt", "mean"),
                                            ("noprop_ct", "mean"), ("noprop_fm", "mean")])
def test_an_evaluation_split_into_parts_counts_what_one_pass_counts(method, sampler):
    """Evaluation runs in parts on several workers: the parts replay the z_0 of the batches before them, so their
    summed counts are exactly one pass's (a part that drew its own z_0 would change the figures)."""
    from noprop_dist.core import StageCounts, batch_parts, build_chain, build_shared, count_stages, make_shard
    from noprop_dist.data import load_dataset, normalize

    ds = load_dataset("digits", test_limit=100)
    extra = ["model.num_shards=2", "model.inference_steps=4"] if method != "noprop_dt" else ["model.num_blocks=3"]
    spec = model_spec(load_config(None, [f"model.method={method}", f"eval.sampler={sampler}", *extra]),
                      ds.image_shape, 10)
    torch.manual_seed(0)
    chain = build_chain(spec, [make_shard(spec, k).state_dict() for k in range(1, spec.num_shards + 1)],
                        build_shared(spec, 0).state_dict())
    x, y = torch.from_numpy(ds.test_x), torch.from_numpy(ds.test_y)

    def norm(b):
        return normalize(b, ds.mean, ds.std)

    whole, _ = count_stages(chain, x, y, 16, 5, norm, "cpu")
    parts = batch_parts(len(y), 16, 3)
    assert [len(p) for p in parts] == [2, 3, 2] and parts[-1].stop == 7
    summed = sum((count_stages(chain, x, y, 16, 5, norm, "cpu", batches=p)[0] for p in parts), StageCounts())
    assert (summed.n, summed.correct, summed.table()) == (whole.n, whole.correct, whole.table())
    assert whole.n == 100 and len(whole.stages) == spec.num_shards
    if method == "noprop_dt":  # eq3 draws noise at every step: a part of it cannot start part-way
        with pytest.raises(ValueError, match="eq3"):
            count_stages(chain, x, y, 16, 5, norm, "cpu", batches=parts[1], sampler="eq3")
