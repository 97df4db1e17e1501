"""The paper's numbers as data (Li, Teh, Pascanu 2025, arXiv 2503.24322; restated in NOPROP.md).

Table 1: test accuracy (%) per method, label embedding and dataset. Table 2: training GPU memory (GB)
with one-hot embeddings. Table 3: epochs. The earlier backprop-free methods (Forward-Forward, LG-FG-A,
DTP) are quoted by the paper without label embeddings, so their numbers hold for every embedding.

Keys follow the config's names: methods as ``model.method``, embeddings as ``model.embedding``
(the paper's "dim=20" column is ``learned`` with ``model.embedding_dim: 20``).
"""
from __future__ import annotations

PAPER_DATASETS = ("mnist", "cifar10", "cifar100")
EMBEDDING_LABELS = {"one_hot": "one-hot", "learned": "dim=20", "prototype": "prototype"}
METHOD_LABELS = {
    "backprop": "Backprop (DT setting)", "noprop_dt": "NoProp-DT", "adjoint": "Adjoint (CT setting)",
    "noprop_ct": "NoProp-CT", "noprop_fm": "NoProp-FM", "dtp": "DTP",
}


def _per_dataset(mnist: float | None, cifar10: float | None, cifar100: float | None) -> dict[str, float]:
    """One Table 1 cell triple (MNIST / CIFAR-10 / CIFAR-100) as a dict, leaving out what the paper lacks."""
    return {k: v for k, v in zip(PAPER_DATASETS, (mnist, cifar10, cifar100)) if v is not None}


# Table 1, test accuracy %: TABLE1[method][embedding][dataset].
TABLE1: dict[str, dict[str, dict[str, float]]] = {
    "backprop": {
        "one_hot": _per_dataset(99.46, 79.92, 45.85),
        "learned": _per_dataset(99.43, 79.30, 46.57),
        "prototype": _per_dataset(99.44, 79.58, 47.80),
    },
    "noprop_dt": {
        "one_hot": _per_dataset(99.47, 79.25, 45.93),
        "learned": _per_dataset(99.49, 79.12, 45.19),
        "prototype": _per_dataset(99.54, 80.54, 46.06),
    },
    "adjoint": {"one_hot": _per_dataset(98.62, 66.78, 25.03)},
    "noprop_ct": {
        "one_hot": _per_dataset(97.84, 73.35, 33.66),
        "learned": _per_dataset(97.70, 71.77, 33.99),
        "prototype": _per_dataset(97.17, 66.54, 21.31),
    },
    "noprop_fm": {
        "one_hot": _per_dataset(99.21, 73.14, 6.38),
        "learned": _per_dataset(99.29, 73.50, 31.14),
        "prototype": _per_dataset(98.52, 75.18, 37.57),
    },
}

# Earlier backprop-free methods the paper compares with (test %; no label embedding involved).
EARLIER_METHODS: dict[str, dict[str, float]] = {
    "Forward-Forward": _per_dataset(98.63, None, None),
    "LG-FG-A": _per_dataset(97.45, 69.32, None),
    "DTP": _per_dataset(98.06, 50.71, None),
}
# Which config method reproduces which earlier-methods row.
EARLIER_METHOD_OF = {"dtp": "DTP"}

# Table 2, training GPU memory in GB, one-hot embeddings only.
TABLE2_GB: dict[str, dict[str, float]] = {
    "backprop": _per_dataset(0.87, 1.17, 1.73),
    "noprop_dt": _per_dataset(0.49, 0.64, 1.23),
    "adjoint": _per_dataset(2.32, 6.23, 6.45),
    "noprop_ct": _per_dataset(1.05, 0.45, 0.50),
    "noprop_fm": _per_dataset(1.06, 0.44, 0.49),
}

# Table 3, training epochs. The baselines are run "in the DT / CT setting": same epochs as that setting.
_DT_EPOCHS = _per_dataset(100, 150, 150)
_CT_EPOCHS = _per_dataset(100, 500, 1000)
PAPER_EPOCHS: dict[str, dict[str, float]] = {
    "noprop_dt": _DT_EPOCHS, "backprop": _DT_EPOCHS,
    "noprop_ct": _CT_EPOCHS, "noprop_fm": _CT_EPOCHS, "adjoint": _CT_EPOCHS,
}

# Table 3's settings of each method beyond those every method shares (config.preset_values, --preset paper), as
# config keys: DT's T = 10 blocks; CT / FM's eta 1, 1000 inference steps and one network over [0, 1] (uniform
# time-shards without overlap, no BatchNorm after the image path); CT's SNR'(t) loss weight and head readout;
# FM's velocity target.
_CONTINUOUS_SETTINGS = {"model.eta": 1.0, "model.inference_steps": 1000, "model.shard_partition": "uniform",
                        "model.shard_overlap": 0.0, "model.image_batch_norm": False}
PAPER_SETTINGS: dict[str, dict[str, float | int | str | bool]] = {
    "noprop_dt": {"model.num_blocks": 10},
    "noprop_ct": _CONTINUOUS_SETTINGS | {"model.ct_loss_weight": "snr_prime", "model.ct_readout": "head"},
    "noprop_fm": _CONTINUOUS_SETTINGS | {"model.fm_target": "velocity"},
}


def paper_test_accuracy(method: str, dataset: str, embedding: str) -> float | None:
    """Table 1's test accuracy (%) for this cell; None where the paper has no number."""
    if method in EARLIER_METHOD_OF:
        return EARLIER_METHODS[EARLIER_METHOD_OF[method]].get(dataset)
    return TABLE1.get(method, {}).get(embedding, {}).get(dataset)


def paper_memory_gb(method: str, dataset: str, embedding: str) -> float | None:
    """Table 2's training GPU memory (GB); the paper measured it with one-hot embeddings only."""
    if embedding != "one_hot":
        return None
    return TABLE2_GB.get(method, {}).get(dataset)


def paper_epochs(method: str, dataset: str) -> int | None:
    """Table 3's epochs for this method and dataset; None where the paper gives none."""
    epochs = PAPER_EPOCHS.get(method, {}).get(dataset)
    return None if epochs is None else int(epochs)


def table1_cells() -> list[tuple[str, str, str]]:
    """Every (method, dataset, embedding) for which the paper reports a test accuracy that a config
    method can reproduce (Table 1's five methods, plus DTP), in the paper's order."""
    cells = [(method, dataset, embedding)
             for method, by_embedding in TABLE1.items()
             for embedding, by_dataset in by_embedding.items()
             for dataset in by_dataset]
    # DTP has no embedding; run it with one-hot labels (the config needs one, the method ignores it).
    cells += [(method, dataset, "one_hot")
              for method, row in EARLIER_METHOD_OF.items() for dataset in EARLIER_METHODS[row]]
    return cells
