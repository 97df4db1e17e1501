"""The same run through the Python API: arrays in, a function as the block, a chain out that predicts."""
import numpy as np

import noprop_dist
from my_blocks import small_block

with np.load("mydata.npz") as f:
    data = noprop_dist.ImageDataset.from_arrays(
        f["train_images"], f["train_labels"], f["test_images"], f["test_labels"],
        name="mydigits", class_names=list(f["class_names"]))

result = noprop_dist.train("quickstart", dataset=data, block=small_block, train={"epochs": 5},
                           data={"val_fraction": 0.1}, run={"dir": "runs/mine_api"})
print("test accuracy", result.summary["test_accuracy"], "- validation", result.summary["val_accuracy"])

chain = noprop_dist.load_chain(result.run_dir)  # no Ray: a torch module that takes raw uint8 images
predicted = chain.predict(data.test_x[:8])
print([chain.class_names[k] for k in predicted], "for", [chain.class_names[k] for k in data.test_y[:8]])
