"""Classification throughput: each backend's classify() on one image at a time against batches, model loaded once.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/bench_classify_batching.py --work_dir outputs/bench_classify

The images are real photographs with one face each (scikit-image's astronaut and matplotlib's Grace Hopper, and
their mirror images), so that every backend runs its attribute models on every image. Backends:

- age_gender: its real bundled weights;
- deepface: DeepFace's gender and race models (VGG-Face) with random weights of their real architecture (the
  real ones download at run time), with the opencv and fastmtcnn detectors (their real weights ship with opencv
  and facenet-pytorch);
- clip: the zero-shot classifier on a random-weight CLIP ViT-L/14 (popalign.tiny_models), the default model's
  architecture.

(The toy reader reads pixels with no model: nothing to batch.) Each mode runs `--repeats` times and the fastest
is kept; the labels of both modes are compared. Prints a markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path


def photographs(count: int):
    import matplotlib.cbook
    from PIL import Image
    from skimage.data import astronaut

    with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")) as hopper:
        hopper = hopper.convert("RGB")
    base = [Image.fromarray(astronaut()), hopper]
    base += [image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for image in base]
    return [base[index % len(base)] for index in range(count)]


def deepface_random_weights(work: Path) -> None:
    """Random weights of DeepFace's gender and race models where DeepFace reads them (as tests/test_classify_deepface.py)."""
    os.environ["DEEPFACE_HOME"] = str(work / "deepface_home")  # before deepface is imported
    import torch
    from deepface.models.demography.pytorch import Gender, Race

    weights = work / "deepface_home" / ".deepface" / "weights"
    weights.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    for module, name in ((Gender, "gender_model_weights.pth"), (Race, "race_model_single_batch.pth")):
        if not (weights / name).is_file():
            torch.save(module.base_model().state_dict(), weights / name)


def timed_modes(classifier, images, batch_size: int, repeats: int) -> dict:
    classifier.classify(images[:1])  # warm-up: lazy loading and first-call costs are not counted
    single_times, batched_times = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        single = [classifier.classify([image])[0] for image in images]
        single_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        batched = [result for first in range(0, len(images), batch_size) for result in classifier.classify(images[first:first + batch_size])]
        batched_times.append(time.perf_counter() - start)
    same_labels = all((a.face_detected, a.gender, a.race, a.age) == (b.face_detected, b.gender, b.race, b.age) for a, b in zip(single, batched))
    score_gap = max((abs((getattr(a, field) or 0.0) - (getattr(b, field) or 0.0)) for a, b in zip(single, batched)
                     for field in ("gender_score", "race_score", "age_score")), default=0.0)
    return {"single": min(single_times), "batched": min(batched_times), "same_labels": same_labels, "score_gap": score_gap,
            "faces": sum(result.face_detected for result in batched)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", default="outputs/bench_classify")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--backends", default="age_gender,deepface-opencv,deepface-fastmtcnn,clip")
    args = parser.parse_args(argv)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    backends = args.backends.split(",")
    if any(name.startswith("deepface") for name in backends):
        deepface_random_weights(work)
    import torch

    from popalign.classify import build_classifier

    images = photographs(args.images)
    rows = []
    for name in backends:
        if name == "age_gender":
            classifier, what = build_classifier("age_gender"), "age_gender (real weights)"
        elif name.startswith("deepface-"):
            detector = name.split("-", 1)[1]
            classifier, what = build_classifier("deepface", detector_backend=detector, device="cpu"), f"deepface, {detector} detector (random attribute weights)"
        elif name == "clip":
            from popalign.tiny_models import build_random_clip_vit_l14

            clip = work / "clip_vit_l14_random"
            if not (clip / "config.json").is_file():
                build_random_clip_vit_l14(clip)
            classifier, what = build_classifier("clip", model=str(clip), device="cpu"), "clip ViT-L/14 (random weights)"
        else:
            parser.error(f"--backends: unknown backend {name!r}")
        measured = timed_modes(classifier, images, args.batch_size, args.repeats)
        rows.append((what, measured))
        print(f"{what}: {measured}", file=sys.stderr, flush=True)
        del classifier

    print(f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} thread(s); "
          f"{args.images} photographs with one face each, batches of {args.batch_size}, fastest of {args.repeats} runs\n")
    print("| backend | one image at a time (images/s) | batches of %d (images/s) | speed-up | same labels (largest score gap) |" % args.batch_size)
    print("|---|---|---|---|---|")
    for what, measured in rows:
        single, batched = args.images / measured["single"], args.images / measured["batched"]
        print(f"| {what} | {single:.2f} | {batched:.2f} | {batched / single:.2f}x | "
              f"{'yes' if measured['same_labels'] else 'NO'} ({measured['score_gap']:.1e}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
