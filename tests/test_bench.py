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
