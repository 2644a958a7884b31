"""A quick linear probe: logistic regression on frozen final-layer encoder features.

Used right after pre-training as a check that the encoder learned something: the same probe on
the same architecture at its random initialisation is the bar to beat. Two features are probed,
the cls token (MAE's linear-probe feature) and the average of the patch tokens.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch.utils.data import DataLoader, Dataset

from ropim.harness.backbone import ViTBackbone
from ropim.harness.progress import tracked


@torch.no_grad()
def extract_features(
    backbone: ViTBackbone,
    dataset: Dataset,
    device: torch.device,
    batch_size: int = 256,
    desc: str = "features",
    layer: int | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Pooled features (:meth:`ViTBackbone.pooled_features`) of every item, in order."""
    was_training = backbone.training
    backbone.eval()
    features: dict[str, list[torch.Tensor]] = {}
    labels = []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    for images, targets in tracked(loader, len(loader), desc):
        for kind, values in backbone.pooled_features(images.to(device), layer).items():
            features.setdefault(kind, []).append(values.float().cpu())
        labels.append(torch.as_tensor(targets))
    backbone.train(was_training)
    return {k: torch.cat(v).numpy() for k, v in features.items()}, torch.cat(labels).numpy()


def probe_accuracy(
    backbone: ViTBackbone,
    train_set: Dataset,
    val_set: Dataset,
    device: torch.device,
    max_iter: int = 2000,
) -> dict[str, float]:
    """Held-out accuracy per feature kind (``cls``, ``avg``) of a logistic-regression probe."""
    x_train, y_train = extract_features(backbone, train_set, device)
    x_val, y_val = extract_features(backbone, val_set, device)
    accuracy = {}
    for kind in x_train:
        classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter))
        classifier.fit(x_train[kind], y_train)
        accuracy[kind] = float(classifier.score(x_val[kind], y_val))
    return accuracy
