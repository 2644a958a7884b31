"""What one training iteration of the dense tasks costs at paper scale on this machine: ViTDet's
ViT-B/16 encoder and pyramid at 1024 px (one image) with window attention
as published against global attention in every block, and UperNet on ViT-B/16 at 512 px in
mmsegmentation's BEiT-style blocks (a relative position table per block, layer scale)
(2 images, as per GPU in the paper).

Each variant runs in its own process (peak resident memory is per process) under a memory cap,
so a variant that does not fit ends as "out of memory" instead of swapping the machine. Heads
that are the same in both ViTDet variants (RPN, RoI heads) are left out: the iteration is the
encoder + pyramid forward and backward with an AdamW step.
"""

from __future__ import annotations

import multiprocessing as mp
import queue as queue_module
import resource
import time
from typing import Any

import torch

from ropim.harness.backbone import ViTBackbone
from ropim.harness.errors import ConfigError

VARIANTS = ("vitdet_windowed", "vitdet_global", "upernet")
# Images per iteration: ViTDet one 1024-px image (time and memory grow about linearly with more;
# detectron2's total is 64), UperNet 2 as per GPU in mmsegmentation's
# upernet_mae-base_fp16_8x2_512x512_160k_ade20k.py (8 GPUs × 2).
BATCH = {"vitdet_windowed": 1, "vitdet_global": 1, "upernet": 2}


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _build(variant: str, image: int, depth: int) -> tuple[torch.nn.Module, Any]:
    from downstream.detection.vitdet import ViTDetPyramid, global_blocks

    torch.manual_seed(0)
    kwargs = {"depth": depth, "dynamic_img_size": True}
    backbone = ViTBackbone("vit_base_patch16_224", image, 16, drop_path=0.1, **kwargs)
    if variant == "upernet":
        from downstream.pyramid import ViTPyramid, default_out_indices
        from downstream.relative_layers import BEIT_NAME, beit_kwargs
        from downstream.segmentation.model import UperNetSegmenter

        # mmsegmentation's MAE backbone: BEiT-style blocks, a relative table each, layer scale
        layers = beit_kwargs(backbone.vit, layer_scale=1.0)
        backbone = ViTBackbone(BEIT_NAME, image, 16, drop_path=0.1, **layers)
        pyramid = ViTPyramid(backbone, default_out_indices(depth))
        model = UperNetSegmenter(pyramid, 150)  # ADE20K's classes, 768/256-channel heads
        return model, lambda out: out["logits"].mean()
    windowed = variant == "vitdet_windowed"
    chosen = global_blocks(depth) if windowed else list(range(depth))
    model = ViTDetPyramid(backbone, 14, chosen)
    return model, lambda out: sum(level.mean() for level in out)


def _iteration(
    variant: str, image: int, depth: int, cap_gib: float, iterations: int, queue: Any
) -> None:
    """In the child: build, then time ``iterations`` iterations (the last one is reported;
    the first pays for first-touch allocations). Always reports, whatever goes wrong."""
    try:
        cap = int(cap_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        model, loss_of = _build(variant, image, depth)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        images = torch.randn(BATCH[variant], 3, image, image)
        built = _peak_mib()
        for _ in range(iterations):
            start = time.perf_counter()
            loss = loss_of(model(images))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            seconds = time.perf_counter() - start
        queue.put({"seconds": seconds, "peak_mib": _peak_mib(), "model_mib": built})
    except MemoryError:
        queue.put({"error": f"out of memory under a {cap_gib:g} GiB cap"})
    except BaseException as exc:  # noqa: BLE001 - the parent must hear back, whatever it was
        reason = "out of memory" if "alloc" in str(exc).lower() else type(exc).__name__
        queue.put({"error": f"{reason} under a {cap_gib:g} GiB cap: {str(exc)[:120]}"})


def _wait_for(process: Any, queue: Any, cap_gib: float) -> dict[str, Any]:
    """The child's report; polls so a child that dies without one cannot hang the caller."""
    while True:
        try:
            return queue.get(timeout=1.0)
        except queue_module.Empty:
            if not process.is_alive():
                try:
                    return queue.get(timeout=1.0)
                except queue_module.Empty:
                    return {
                        "error": f"the process ended without a report (exit {process.exitcode}) "
                        f"under a {cap_gib:g} GiB cap"
                    }


def bench_dense(
    variants: tuple[str, ...] = VARIANTS,
    detection_size: int = 1024,
    segmentation_size: int = 512,
    depth: int = 12,
    cap_gib: float = 18.0,
    iterations: int = 2,
) -> list[dict[str, Any]]:
    """One row per variant: seconds for one iteration, peak resident memory of its process."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ConfigError(f"unknown bench-dense variant(s) {unknown}; choose from {VARIANTS}")
    context = mp.get_context("spawn")
    rows = []
    for variant in variants:
        image = segmentation_size if variant == "upernet" else detection_size
        queue = context.Queue()
        process = context.Process(
            target=_iteration, args=(variant, image, depth, cap_gib, iterations, queue)
        )
        process.start()
        result = _wait_for(process, queue, cap_gib)
        process.join()
        row = {"variant": variant, "image": image, "batch": BATCH[variant], "depth": depth}
        rows.append(row | result)
    return rows
