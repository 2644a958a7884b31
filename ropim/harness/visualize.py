"""``reconstructions.png``: original, what the encoder saw, what the decoder painted back."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from ropim.harness.methods import MaskingMethod  # noqa: E402


def _to_display(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    mean_t = torch.tensor(mean, dtype=images.dtype).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=images.dtype).view(1, -1, 1, 1)
    return (images * std_t + mean_t).clamp(0, 1).permute(0, 2, 3, 1)


@torch.no_grad()
def save_reconstructions(
    method: MaskingMethod,
    images: Tensor,
    path: Path,
    mean: Sequence[float],
    std: Sequence[float],
    generator: torch.Generator | None = None,
) -> None:
    was_training = method.training
    method.eval()
    out = method.compute(images, generator)
    method.train(was_training)
    rows = {
        "original": images,
        "encoder input": method.encoder_view(images, out.state),
        "reconstruction": method.reconstruct(out.prediction.float(), images, out.state),
    }
    n = images.shape[0]
    # Grey images (every channel equal, as the digits are) are drawn grey in every row: a
    # decoder predicts each channel on its own, and its small per-channel differences would
    # otherwise show as coloured noise that is not in the data.
    grey = images.shape[1] == 1 or bool(torch.allclose(images[:, :1].expand_as(images), images))
    fig, axes = plt.subplots(len(rows), n, figsize=(1.3 * n, 1.4 * len(rows)), squeeze=False)
    for r, (label, batch) in enumerate(rows.items()):
        shown = _to_display(batch.float().cpu(), mean, std).numpy()
        for c in range(n):
            ax = axes[r][c]
            image = shown[c]
            if grey:
                ax.imshow(image.mean(axis=-1), cmap="gray", vmin=0.0, vmax=1.0)
            else:
                ax.imshow(image)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel(label, fontsize=8)
    fig.suptitle(f"{method.name}: loss {out.loss.item():.4f}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
