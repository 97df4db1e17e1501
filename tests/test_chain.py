"""The assembled chain: save and load give the same predictions (that no network input depends on the labels is
tested for every block in test_blocks.py)."""
import pytest
import torch
from conftest import make_spec

from noprop_dist.core import DTChain, build_block, build_shared, load_chain_file


def _chain(embedding="learned", class_prob="softmax"):
    spec = make_spec(embedding, num_shards=3, class_prob=class_prob)
    proto = torch.randn(spec.num_classes, spec.embed_dim) if embedding == "prototype" else None
    return DTChain(spec, [build_block(spec, t, 0) for t in (1, 2, 3)], build_shared(spec, 0, proto)).eval()


@pytest.mark.parametrize("embedding,class_prob", [("one_hot", "softmax"), ("learned", "radial"), ("prototype", "softmax")])
def test_save_load_round_trip(tmp_path, embedding, class_prob):
    chain = _chain(embedding, class_prob)
    x = torch.randn(20, 1, 8, 8)
    before = chain.predict(x, torch.Generator().manual_seed(3))
    path = str(tmp_path / "chain.pt")
    chain.save(path, extra={"note": "x"})
    loaded, extra = load_chain_file(path)
    assert extra == {"note": "x"}
    assert torch.equal(loaded.predict(x, torch.Generator().manual_seed(3)), before)
    log_probs = loaded(x, torch.Generator().manual_seed(3))
    assert torch.allclose(log_probs.exp().sum(1), torch.ones(20), atol=1e-5)


def test_chain_needs_all_blocks():
    spec = make_spec(num_shards=3)
    with pytest.raises(ValueError, match="3 shard networks, got 1"):
        DTChain(spec, [build_block(spec, 1, 0)], build_shared(spec, 0))


def _saved(tmp_path, mutate) -> str:
    """A saved chain file whose payload ``mutate`` has altered."""
    path = str(tmp_path / "chain.pt")
    _chain().save(path)
    payload = torch.load(path, weights_only=True)
    mutate(payload)
    torch.save(payload, path)
    return path


@pytest.mark.parametrize("mutate,message", [
    (lambda p: p["blocks"][1].pop(next(iter(p["blocks"][1]))), "shard 2 of 3: the saved weights do not fit"),
    (lambda p: p["shared"].__setitem__("head.weight", torch.zeros(3, 3)), "shared state: the saved weights"),
    (lambda p: p["spec"].__setitem__("num_shards", 4), "4 shard networks but 3 weight sets"),
    (lambda p: p["spec"].__setitem__("colour", "red"), "chain spec does not fit"),
    (lambda p: p.pop("shared"), "chain file lacks shared"),
    (lambda p: p.__setitem__("format", 99), "unsupported chain format 99"),
    # a small file whose spec asks for networks no config could: refused before any is built (137 GB seen)
    (lambda p: p["spec"].__setitem__("embed_dim", 10**9), r"chain spec out of bounds \(embed_dim 1000000000"),
    (lambda p: p["spec"].__setitem__("image_shape", [3, 100_000, 100_000]), "chain spec out of bounds .image_shape"),
    (lambda p: p["spec"].__setitem__("num_shards", 10**7), "chain spec out of bounds .num_shards"),
    # a method without a chain, or no method name at all: refused before any network is built
    (lambda p: [d.__setitem__("method", "backprop") for d in (p, p["spec"])], r"out of bounds \(method 'backprop'\)"),
    (lambda p: [d.__setitem__("method", ["noprop_dt"]) for d in (p, p["spec"])], r"out of bounds \(method \['noprop"),
    (lambda p: p["spec"].__setitem__("num_classes", -1), "chain spec out of bounds .num_classes"),
    (lambda p: p.__setitem__("extra", [1, 2]), "chain file's extra is a list, not a mapping"),
])
def test_broken_chain_file_is_a_value_error(tmp_path, mutate, message):
    """Every way a chain file can disagree with its network is one ValueError naming the part (the CLI's exit 2)."""
    path = _saved(tmp_path, mutate)
    with pytest.raises(ValueError, match=message):
        load_chain_file(path)


def test_chain_saved_with_the_old_spec_key_num_blocks_loads(tmp_path):
    """Chains saved before ModelSpec.num_blocks became num_shards keep loading, and predict the same."""
    path = _saved(tmp_path, lambda p: p["spec"].__setitem__("num_blocks", p["spec"].pop("num_shards")))
    old, new = load_chain_file(path)[0], _chain()
    assert old.spec == new.spec
    x = torch.randn(5, *new.spec.image_shape)
    assert torch.equal(old(x, torch.Generator().manual_seed(0)), new(x, torch.Generator().manual_seed(0)))


def test_chain_saved_before_the_later_spec_keys_loads_as_it_was_trained(tmp_path):
    """A chain file that predates ModelSpec's later keys gets the values its chain was trained with (the paper's
    sampler, SNR'(t), the head, velocity), not the config's defaults of today (mean, flat, nearest, endpoint)."""
    later = ("method", "inference_steps", "sampler", "ensemble_draws", "shard_partition", "shard_overlap",
             "ct_loss_weight", "image_batch_norm", "ct_readout", "fm_target", "block")
    path = _saved(tmp_path, lambda p: [p["spec"].pop(k) for k in later])
    old, new = load_chain_file(path)[0], _chain()
    assert (old.spec.method, old.spec.sampler, old.spec.ct_loss_weight, old.spec.ct_readout, old.spec.fm_target) == \
        ("noprop_dt", None, "snr_prime", "head", "velocity")
    assert old.spec == new.spec and old.sampler_name() == "eq3"
    x = torch.randn(5, *new.spec.image_shape)
    assert torch.equal(old(x, torch.Generator().manual_seed(0)), new(x, torch.Generator().manual_seed(0)))


def test_truncated_chain_file_is_a_value_error(tmp_path):
    path = tmp_path / "chain.pt"
    _chain().save(str(path))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="not a readable chain file"):
        load_chain_file(str(path))


@pytest.mark.parametrize("extra,needle", [
    ({"std": [1.0], "dataset": "digits", "eval_seed": 1, "eval_batch_size": 10}, "lacks 'mean'"),
    ({"mean": "0.5", "std": [1.0], "dataset": "digits", "eval_seed": 1, "eval_batch_size": 10}, "has mean='0.5'"),
    ({"mean": [0.5], "std": [0.0], "dataset": "digits", "eval_seed": 1, "eval_batch_size": 10}, "has std=[0.0]"),
    ({"mean": [0.5], "std": [1.0], "dataset": "digits", "eval_seed": True, "eval_batch_size": 10}, "eval_seed=True"),
])
def test_a_chain_whose_extra_is_missing_or_mistyped_is_one_line(tmp_path, extra, needle):
    """Bug seen: a chain.pt without (or with a mistyped) mean, std or evaluation setting ended in a KeyError or
    TypeError traceback in load_chain / evaluate."""
    from noprop_dist.evaluate import evaluation

    _chain().save(str(tmp_path / "chain.pt"), extra=extra)
    with pytest.raises(ValueError) as e:
        evaluation(str(tmp_path))
    assert needle in str(e.value) and str(tmp_path / "chain.pt") in str(e.value) and "\n" not in str(e.value)
