"""Classify the images of a generated folder: face found?, gender, race (and their scores).

    accelerate launch -m popalign.classify --output_dir outputs/images/neutral --classifier deepface --detector yunet

Writes <out_dir>/labels_<classifier>.csv (docs/data_formats.md); a re-run resumes.
"""

import argparse
import sys

from popalign.classify import CLASSIFIERS
from popalign.io import HelpFormatter, InputError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--output_dir", "--out_dir", dest="out_dir", required=True, help="image folder written by generation (holds manifest.csv)")
    parser.add_argument("--classifier", default="deepface", choices=list(CLASSIFIERS), help="classification backend")
    parser.add_argument("--detector", default="yunet",
                        help="DeepFace face detector backend (the original used yunet, which downloads its weights; "
                             "fastmtcnn uses the MTCNN weights of facenet-pytorch, installed with the package)")
    parser.add_argument("--clip_model", default="openai/clip-vit-large-patch14", help="CLIP model id or folder for --classifier clip")
    parser.add_argument("--face_threshold", type=float, default=0.5,
                        help="--classifier clip: minimum zero-shot probability of 'a photo of a person's face' to count a face")
    parser.add_argument("--batch_size", type=int, default=16, help="images per classify() call, per process")
    return parser


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    from popalign.classify.run import classifier_options, run_classification
    from popalign.distributed import make_accelerator

    accelerator = make_accelerator()
    options = classifier_options(args.classifier, args.detector, args.clip_model, args.face_threshold, str(accelerator.device))
    try:
        run_classification(args.out_dir, args.classifier, options, args.batch_size, accelerator)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
