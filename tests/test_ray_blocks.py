"""The shipped alternative block and a user's own on a real local Ray cluster, through the guarantees Fig. 6 has:
a worker killed and restarted from its checkpoint, the run resumed for another epoch, and the result equal bit
for bit to the in-process reference run; metrics per block; the saved chain loads and predicts."""
import json

import pytest
import torch
from custom_block import TinyMLP, tiny_block

import noprop_dist
from noprop_dist.config import load_config
from noprop_dist.data import load_dataset
from noprop_dist.distributed.faults import ENV_VAR
from noprop_dist.storage.checkpoints import CheckpointStore
from noprop_dist.training import train_in_process

pytestmark = pytest.mark.ray

RUN = {"model.num_blocks": 2, "model.num_shards": 2, "cluster.num_workers": 1, "train.sync_mode": "sync",
       "data.train_limit": 300, "data.test_limit": 100, "train.batch_size": 64, "model.inference_steps": 10,
       "eval.every_epochs": 1, "metrics.write_every_seconds": 0.5}


@pytest.mark.parametrize("block,method", [("resnet", "noprop_dt"), ("resnet", "noprop_ct"), ("custom", "noprop_dt"),
                                          ("custom", "noprop_fm")])
def test_a_block_keeps_restart_resume_parity_and_metrics_on_ray(ray_cluster, tmp_path, monkeypatch, block, method):
    """The custom block is a function given to the Python API, defined in a module the workers cannot import:
    it reaches them by value."""
    run_dir = tmp_path / "run"
    kw = {"block": tiny_block} if block == "custom" else {"model.block": block}
    values = RUN | {"model.method": method, "run.dir": str(run_dir)}
    monkeypatch.setenv(ENV_VAR, "kill:0@2.0")  # the worker dies as epoch 2 begins
    first = noprop_dist.train(None, log=print, **values, **{"train.epochs": 2}, **kw).summary
    assert [(e["kind"], e["resumed_from_epoch"]) for e in first["restarts"]] == [("worker", 1)]
    monkeypatch.delenv(ENV_VAR)
    summary = noprop_dist.train(None, log=print, **values, **{"train.epochs": 3}, **kw).summary  # resumes
    assert summary["block"] == ("custom_block:tiny_block" if block == "custom" else block)

    cfg = load_config(None, values=values | {"train.epochs": 3} | ({"model.block": block} if block != "custom" else
                                                                   {"model.block": "custom_block:tiny_block"}))
    ds = load_dataset("digits", train_limit=300, test_limit=100)
    ref_blocks, ref_shared, _ = train_in_process(cfg, ds, block=tiny_block if block == "custom" else None)
    saved = CheckpointStore(str(run_dir)).load_resume(2)
    assert saved.epochs_done == 3
    for t in (1, 2):
        for k, v in ref_blocks[t]["block"].items():
            assert torch.equal(saved.block_states[t]["block"][k], v), f"shard {t}: {k} differs"
    for k, v in ref_shared["shared"].items():
        assert torch.equal(saved.shared_state["shared"][k], v), f"shared {k} differs"

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {r["block"] for r in rows if r.get("event") == "epoch"} == {1, 2}
    assert [p["epoch"] for p in summary["curve"]] == [1, 2, 3] and all("test_accuracy" in p for p in summary["curve"])
    chain = noprop_dist.load_chain(str(run_dir))  # custom: rebuilt by importing custom_block:tiny_block
    if block == "custom":
        assert isinstance(chain.chain.blocks[0], TinyMLP)
    preds = chain.predict(ds.test_x)
    assert preds.shape == (100,) and summary["test_accuracy"] == pytest.approx(float((preds == ds.test_y).mean()),
                                                                              abs=0.1)
