"""Writes mydata.npz, the file `data.name: npz` reads, from scikit-learn's 8x8 digits: uint8 images (N, H, W),
integer labels (N,), and the class names."""
import numpy as np
from sklearn.datasets import load_digits

digits = load_digits()
images = np.rint(digits.images * 255 / 16).astype(np.uint8)  # (1797, 8, 8), values 0..255
labels = digits.target.astype(np.int64)  # (1797,), 0..9
order = np.random.default_rng(0).permutation(len(labels))
test, train = order[:360], order[360:]
names = np.array(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])
np.savez_compressed("mydata.npz", train_images=images[train], train_labels=labels[train],
                    test_images=images[test], test_labels=labels[test], class_names=names)
print(f"mydata.npz: {len(train)} train / {len(test)} test images {images.shape[1:]}, {len(names)} classes")
