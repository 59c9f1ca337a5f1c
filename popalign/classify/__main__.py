"""Classify the images of a generated folder: face found?, gender, race (and their scores).

    accelerate launch -m popalign.classify --output_dir outputs/images/neutral --classifier deepface --detector yunet

Writes <out_dir>/labels_<classifier>.csv (docs/data_formats.md); a re-run resumes.
"""

import argparse
import sys
from pathlib import Path

from popalign.classify import CLASSIFIERS
from popalign.classify.run import DEFAULT_CLIP_MODEL, DEFAULT_DETECTOR, DEFAULT_FACE_THRESHOLD
from popalign.image_folder import labels_path, manifest_path
from popalign.io import ArgumentParser, InputError, check_model_location, check_output_location, exit_2_on_input_error


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--output_dir", "--out_dir", dest="out_dir", required=True, help="image folder written by generation (holds manifest.csv)")
    parser.add_argument("--classifier", default="deepface", choices=list(CLASSIFIERS), help="classification backend")
    parser.add_argument("--detector", default=DEFAULT_DETECTOR,
                        help="DeepFace face detector backend (the original used yunet, which downloads its weights; "
                             "fastmtcnn uses the MTCNN weights of facenet-pytorch, installed with the package)")
    parser.add_argument("--clip_model", default=DEFAULT_CLIP_MODEL, help="CLIP model id or folder for --classifier clip")
    parser.add_argument("--face_threshold", type=float, default=DEFAULT_FACE_THRESHOLD,
                        help="--classifier clip: minimum zero-shot probability of 'a photo of a person's face' to count a face")
    parser.add_argument("--batch_size", type=int, default=16, help="images per classify() call, per process")
    parser.add_argument("--validate_only", action="store_true",
                        help="check flags and the folder (its manifest once generation wrote it), write nothing, exit (2: what is wrong)")
    return parser


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def validate_classification(args) -> None:
    """Flags and output files checked before any model loads: a wrapper runs this before generation, so a typo fails
    in seconds rather than after the images."""

    if args.batch_size < 1:
        raise InputError(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.classifier == "deepface" and args.detector != "skip":
        from deepface.modules.modeling import AVAILABLE_MODELS

        detectors = sorted(AVAILABLE_MODELS["face_detector"])
        if args.detector not in detectors:
            raise InputError(f"--detector: unknown DeepFace detector {args.detector!r} (known: skip, {', '.join(detectors)})")
    if args.classifier == "clip":
        if not 0.0 <= args.face_threshold <= 1.0:
            raise InputError(f"--face_threshold must be in [0, 1], got {args.face_threshold}")
        check_model_location("clip_model", args.clip_model)
    check_output_location(args.out_dir, "--output_dir", folder=True)
    check_output_location(labels_path(args.out_dir, args.classifier), "--output_dir (labels file)")


@exit_2_on_input_error
def main(argv=None) -> int:
    args = parse_args(argv)
    validate_classification(args)
    if args.validate_only:
        if Path(manifest_path(args.out_dir)).exists():  # before generation there is none yet
            from popalign.classify.run import read_manifest_image_paths

            read_manifest_image_paths(args.out_dir)
        return 0
    # run_classification reads (and checks) the manifest before it loads any model.
    from popalign.classify.run import classifier_options, run_classification
    from popalign.distributed import make_accelerator

    accelerator = make_accelerator()
    options = classifier_options(args.classifier, args.detector, args.clip_model, args.face_threshold, str(accelerator.device))
    run_classification(args.out_dir, args.classifier, options, args.batch_size, accelerator)
    return 0


if __name__ == "__main__":
    sys.exit(main())
