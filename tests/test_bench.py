from ropim.harness.config import load_config
from ropim.suite.bench import bench_step
from tests.conftest import TINY_CONFIG


def test_bench_step_reports_speed_of_real_training_steps():
    result = bench_step(load_config(TINY_CONFIG), warmup=1, steps=2)
    assert result["method"] == "ropim" and result["device"] == "cpu"
    assert result["images_per_s"] > 0 and result["step_ms"] > 0
    assert result["batch_size"] == 32 and result["timed_steps"] == 2


def test_gpu_check_without_a_gpu_says_so_in_one_line(capsys):
    from ropim.cli import main

    assert main(["gpu-check", "--out", "/nonexistent/gpu"]) == 2
    assert capsys.readouterr().err == (
        "error: gpu-check needs a CUDA device and none is visible; run it on a GPU\n"
    )


def test_step_flops_are_about_three_forward_passes_and_attention_is_fused():
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ropim.harness.pretrain import set_up_pretraining
    from ropim.suite.bench import peak_tflops

    cfg = load_config(TINY_CONFIG)
    result = bench_step(cfg, warmup=1, steps=2)
    method = set_up_pretraining(cfg).method
    with FlopCounterMode(display=False) as forward:
        method(torch.randn(32, 3, 28, 28), torch.Generator().manual_seed(0))
    ratio = result["flops_per_step"] / forward.get_total_flops()
    assert 2.5 < ratio < 3.5, ratio  # backward ~ 2x forward
    assert result["tflops_per_s"] > 0 and result["mfu"] is None  # CPU: no peak to divide by
    assert result["fused_attention"] is True and result["compiled"] is False
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0 and peak_tflops("Tesla T4") is None
