"""Speed ratios of the two places where the compute goes, measured in one run on this machine.

1. Generation: images per second at several batch sizes (same images, same seeds).
2. Training: the cost of encoding a pair (VAE + text encoders) against a training step that reads
   cached encodings, i.e. what the content-keyed encoding cache saves per step.

    python benchmarks/bench_pipeline.py [--model PATH] [--resolution 64]

Without --model it builds a tiny SDXL-shaped pipeline; numbers on a real model and a GPU differ,
the ratios are the point. Run with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def bench_generation(model: str, resolution: int, steps: int, num_images: int, batch_sizes: list[int], work: Path) -> dict[int, float]:
    import pandas as pd

    from popalign.generate import GenerationSettings, generate_images
    from popalign.prompts import prompt_id

    prompts = [f"a photo of a worker number {index}" for index in range(num_images)]
    prompts_csv = work / "prompts.csv"
    pd.DataFrame({"prompt_id": [prompt_id(text) for text in prompts], "kind": "neutral", "prompt": prompts}).to_csv(prompts_csv, index=False)
    settings = GenerationSettings(model=model, steps=steps, width=resolution, height=resolution, precision="fp32")
    seconds = {}
    for batch_size in [1, *batch_sizes]:  # the first run warms up caches and is not reported
        start = time.perf_counter()
        generate_images(prompts_csv, work / f"images_batch{batch_size}_{time.perf_counter_ns()}", settings, 1, 1, batch_size)
        seconds[batch_size] = time.perf_counter() - start
    return {batch_size: num_images / seconds[batch_size] for batch_size in batch_sizes}


def bench_training(model: str, resolution: int, num_pairs: int, num_steps: int, work: Path) -> tuple[float, float]:
    import numpy as np
    import pandas as pd
    from PIL import Image

    from popalign.training.config import config_from_args
    from popalign.training.trainer import prepare_run, run_training

    rng = np.random.default_rng(0)
    images = work / "pairs"
    images.mkdir()
    rows = []
    for index in range(num_pairs):
        for side in ("winner", "loser"):
            Image.fromarray(rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)).save(images / f"{side}{index}.png")
        rows.append({"winner_path": f"pairs/winner{index}.png", "loser_path": f"pairs/loser{index}.png", "caption": f"a photo of a worker {index}"})
    pd.DataFrame(rows).to_csv(work / "pairs.csv", index=False)

    def run(output: str, steps: int) -> tuple[float, float]:
        config = config_from_args(["--pairs_file", str(work / "pairs.csv"), "--output_dir", str(work / output), "--pretrained_model", model,
                                   "--vae", "", "--resolution", str(resolution), "--max_train_steps", str(steps), "--lr_warmup_steps", "0",
                                   "--mixed_precision", "no", "--gradient_checkpointing", "off", "--checkpointing_steps", "0",
                                   "--report_to", "none", "--train_batch_size", "1", "--caption_dropout", "0", "--use_8bit_adam", "off"])
        start = time.perf_counter()
        prepared = prepare_run(config)
        prepared_at = time.perf_counter()
        run_training(prepared)
        return prepared_at - start, time.perf_counter() - prepared_at

    cold_prepare, _ = run("cold", 1)  # encodes every pair into the cache
    warm_prepare, train_seconds = run("warm", num_steps)  # reads the cache
    encode_seconds_per_pair = max(cold_prepare - warm_prepare, 0.0) / num_pairs
    return encode_seconds_per_pair, train_seconds / num_steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="", help="pipeline folder or id (default: a freshly built tiny SDXL)")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="sampling steps")
    parser.add_argument("--num_images", type=int, default=48)
    parser.add_argument("--batch_sizes", default="1,4,16")
    parser.add_argument("--num_pairs", type=int, default=32)
    parser.add_argument("--train_steps", type=int, default=20)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        model = args.model
        if not model:
            from popalign.tiny_models import build_tiny_sdxl_pipeline

            model = str(build_tiny_sdxl_pipeline(work / "tiny-sdxl"))
        batch_sizes = [int(size) for size in args.batch_sizes.split(",")]
        throughput = bench_generation(model, args.resolution, args.steps, args.num_images, batch_sizes, work)
        encode, step = bench_training(model, args.resolution, args.num_pairs, args.train_steps, work)
    print(f"\nthreads: {torch.get_num_threads()}, model: {args.model or 'tiny SDXL'}, {args.resolution}x{args.resolution}")
    print("| batch size | images/s | speed-up vs batch 1 |\n|---|---|---|")
    for batch_size in batch_sizes:
        print(f"| {batch_size} | {throughput[batch_size]:.2f} | {throughput[batch_size] / throughput[batch_sizes[0]]:.2f}x |")
    print(f"\nencoding one pair (VAE + text encoders): {encode * 1000:.1f} ms; one training step from the cache: {step * 1000:.1f} ms; "
          f"a step that re-encoded its pair would take {(encode + step) / step:.2f}x as long")


if __name__ == "__main__":
    main()
