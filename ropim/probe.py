"""A quick linear probe: logistic regression on frozen, average-pooled encoder features.

Used right after pre-training as a sanity check that the encoder learned something: the same
probe on the same architecture at its random initialisation is the bar to beat.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch.utils.data import DataLoader, Dataset

from ropim.backbone import ViTBackbone


@torch.no_grad()
def extract_features(
    backbone: ViTBackbone, dataset: Dataset, device: torch.device, batch_size: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    was_training = backbone.training
    backbone.eval()
    features, labels = [], []
    for images, targets in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        features.append(backbone.pooled_features(images.to(device)).float().cpu())
        labels.append(torch.as_tensor(targets))
    backbone.train(was_training)
    return torch.cat(features).numpy(), torch.cat(labels).numpy()


def probe_accuracy(
    backbone: ViTBackbone,
    train_set: Dataset,
    val_set: Dataset,
    device: torch.device,
    max_iter: int = 2000,
) -> float:
    """Held-out accuracy of a logistic-regression probe trained on ``train_set`` features."""
    x_train, y_train = extract_features(backbone, train_set, device)
    x_val, y_val = extract_features(backbone, val_set, device)
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter))
    classifier.fit(x_train, y_train)
    return float(classifier.score(x_val, y_val))
