"""benchmarks/gpu_check.sh, the prepared GPU measurement, run in its smoke mode (tiny models, CPU): it must build the
models, time every speed option at every batch and a training step, and write the table it prints."""

import json
import os
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_smoke_mode_writes_the_full_table(tmp_path):
    env = {**os.environ, "GPU_CHECK_SMOKE": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(["bash", "benchmarks/gpu_check.sh", str(tmp_path / "check")], cwd=REPO_ROOT, env=env,
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    table = (tmp_path / "check" / "gpu_check.md").read_text()
    assert completed.stdout == table
    measured = json.loads((tmp_path / "check" / "gpu_check.json").read_text())
    assert measured["smoke"] and not measured["skipped"]
    # every speed option but torch.compile (left out on the CPU) at both smoke batches, each a positive rate
    assert {(row["option"], row["batch"]) for row in measured["generation"]} == \
        {(option, batch) for option in ("none", "channels_last", "vae_slicing", "vae_tiling") for batch in (1, 2)}
    assert all(row["images_per_second"] > 0 for row in measured["generation"])
    for option in ("channels_last", "vae_slicing", "vae_tiling"):
        assert f"| {option} | 2 |" in table
    assert measured["training"]["seconds_per_step"] > 0 and measured["training"]["trainable_parameters"] > 0
    assert "s per step, peak" in table


def test_gpu_check_refuses_to_run_without_a_gpu_outside_smoke_mode(tmp_path):
    import torch

    if torch.cuda.is_available():
        return  # the full check would run here
    completed = subprocess.run(["bash", "benchmarks/gpu_check.sh", str(tmp_path / "check")], cwd=REPO_ROOT,
                               env={**os.environ, "GPU_CHECK_SMOKE": "0"}, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2
    assert "no CUDA GPU" in completed.stderr
    assert not (tmp_path / "check" / "gpu_check.md").exists()
