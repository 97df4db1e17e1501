"""Label embeddings: prototype initialisation, and every embedding / class-probability variant trains."""
import pytest
import torch

from noprop_dist.config import load_config
from noprop_dist.core import prototype_embedding
from noprop_dist.data import load_dataset
from noprop_dist.training import evaluate_states, model_spec, train_in_process


def test_prototype_is_the_image_with_smallest_median_distance():
    # Class 0: three images near 0 and one outlier; the one at exactly 0 is closest to the rest.
    imgs = torch.tensor([[0.1], [0.0], [-0.1], [5.0], [10.0], [10.2], [9.0]]).view(7, 1, 1, 1)
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    protos = prototype_embedding(imgs, labels, num_classes=2)
    assert protos.shape == (2, 1)
    assert protos[0].item() == 0.0
    assert protos[1].item() == 10.0


def test_prototype_needs_every_class():
    with pytest.raises(ValueError, match="class 2 has no training images"):
        prototype_embedding(torch.zeros(4, 1, 2, 2), torch.tensor([0, 0, 1, 1]), num_classes=3)


@pytest.mark.parametrize("embedding,class_prob", [
    ("one_hot", "softmax"), ("learned", "radial"), ("prototype", "softmax"),
])
def test_each_variant_learns_digits(embedding, class_prob):
    """A few epochs in-process on real digits: every variant beats chance (0.1) clearly."""
    cfg = load_config(None, [f"model.embedding={embedding}", f"model.class_prob={class_prob}",
                             "model.num_blocks=4", "train.epochs=4", "cluster.num_workers=1"])
    data = load_dataset("digits")
    blocks, shared, group = train_in_process(cfg, data)
    spec = model_spec(cfg, data.image_shape, data.num_classes)
    if embedding == "prototype":
        assert spec.embed_dim == 64 and spec.image_like_label
    _, acc = evaluate_states(spec, data, blocks, shared, 1000, 0)
    assert acc > 0.4, (embedding, class_prob, acc)
    first = [st.last_epoch_mean_loss for st in group.stats.values()]
    assert all(torch.isfinite(torch.tensor(first)))
