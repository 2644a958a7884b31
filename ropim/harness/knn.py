"""Weighted k-NN on frozen features (DINO's monitor): cosine similarity, votes exp(sim/T).

Shared by the k-NN protocol of the classification task and the monitor during pre-training."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from ropim.harness.progress import tracked


@torch.no_grad()
def knn_predict(
    train_features: Tensor,
    train_labels: Tensor,
    query_features: Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> Tensor:
    """Predicted class per query: the k most cosine-similar training samples vote with
    weight ``exp(similarity / temperature)``."""
    bank = F.normalize(train_features.float(), dim=1)
    k = min(k, len(bank))
    predictions = []
    starts = range(0, len(query_features), chunk)
    for start in tracked(starts, len(starts), "k-NN", unit="chunk"):
        query = F.normalize(query_features[start : start + chunk].float(), dim=1)
        similarity, index = (query @ bank.T).topk(k, dim=1)
        votes = torch.zeros(len(query), num_classes, device=query.device)
        votes.scatter_add_(1, train_labels[index], (similarity / temperature).exp())
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions)


def knn_accuracy(
    train_features: Tensor,
    train_labels: Tensor,
    val_features: Tensor,
    val_labels: Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
) -> float:
    predicted = knn_predict(train_features, train_labels, val_features, num_classes, k, temperature)
    return float((predicted == val_labels).float().mean())
