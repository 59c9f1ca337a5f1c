"""A face detector on real photographs: scikit-image's, with and without a face, read through DeepFace.

    python -m popalign.classify.photographs --detector fastmtcnn

prints, for each photograph, whether it shows a face and what DeepFace's detector found, then the
detection rate on the photographs with a face and the false-detection rate on those without. It runs
offline with detectors whose weights install with a package (`fastmtcnn`: facenet-pytorch's MTCNN;
`opencv`: OpenCV's Haar cascade). yunet, the pipeline's default, downloads its weights on first use.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import numpy as np


def _grey_to_rgb(image: np.ndarray) -> np.ndarray:
    return np.stack([image] * 3, axis=-1) if image.ndim == 2 else image


def photographs() -> list[tuple[str, bool, np.ndarray]]:
    """(name, shows a face, RGB uint8 array): scikit-image's photographs, variants, and images with no face."""
    from skimage import data

    astronaut = data.astronaut()
    return [
        ("astronaut", True, astronaut),
        ("astronaut, mirrored", True, np.ascontiguousarray(astronaut[:, ::-1])),
        ("astronaut, 128 px", True, np.ascontiguousarray(astronaut[::4, ::4])),
        ("cameraman (grey)", True, _grey_to_rgb(data.camera())),
        ("coffee", False, data.coffee()),
        ("cat (chelsea)", False, data.chelsea()),
        ("rocket", False, data.rocket()),
        ("coins (grey)", False, _grey_to_rgb(data.coins())),
        ("blank", False, np.full((256, 256, 3), 255, dtype=np.uint8)),
        ("noise", False, np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)),
    ]


@dataclass(frozen=True)
class Detection:
    name: str
    has_face: bool
    faces: list[dict]  # DeepFace's facial_area of each face found, with its confidence


def detect_faces(rgb: np.ndarray, detector_backend: str) -> list[dict]:
    """DeepFace's face detection (the step `DeepFace.analyze` runs first) on one RGB image; [] when none."""
    from deepface import DeepFace
    from deepface.modules.exceptions import FaceNotDetected

    bgr = np.ascontiguousarray(rgb[:, :, ::-1])  # DeepFace reads OpenCV's channel order
    try:
        found = DeepFace.extract_faces(bgr, detector_backend=detector_backend, enforce_detection=True)
    except FaceNotDetected:
        return []
    return [dict(face["facial_area"], confidence=float(face["confidence"])) for face in found]


def detect_in_photographs(detector_backend: str) -> list[Detection]:
    return [Detection(name, has_face, detect_faces(rgb, detector_backend)) for name, has_face, rgb in photographs()]


def detection_table(detections: list[Detection], detector_backend: str) -> str:
    lines = ["| photograph | shows a face | faces found | confidence |", "|---|---|---|---|"]
    for detection in detections:
        confidences = ", ".join(f"{face['confidence']:.3f}" for face in detection.faces) or "-"
        lines.append(f"| {detection.name} | {'yes' if detection.has_face else 'no'} | {len(detection.faces)} | {confidences} |")
    with_face = [detection for detection in detections if detection.has_face]
    without = [detection for detection in detections if not detection.has_face]
    found = sum(bool(detection.faces) for detection in with_face)
    false = sum(bool(detection.faces) for detection in without)
    lines += ["", f"Detector `{detector_backend}`: faces found in {found} of {len(with_face)} photographs with a face "
                  f"({found / len(with_face):.0%}); a face reported in {false} of {len(without)} images without one."]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detector", default="fastmtcnn", help="DeepFace detector backend")
    args = parser.parse_args(argv)
    print(detection_table(detect_in_photographs(args.detector), args.detector))
    return 0


if __name__ == "__main__":
    sys.exit(main())
