"""Classify every image of a generated folder, sharded over processes and resumable.

Reads `<out_dir>/manifest.csv`, writes `<out_dir>/labels_<classifier>.csv` (docs/data_formats.md).
Resumable through popalign.image_jobs: a re-run, with any number of processes, skips every image
already classified. The final CSV is written by the main process, atomically, in manifest order,
once every image has a row.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import pandas as pd
from tqdm.auto import tqdm

from popalign.classify import build_classifier
from popalign.classify.base import Classifier
from popalign.image_folder import LABEL_COLUMNS, labels_path, read_manifest
from popalign.image_jobs import ImageJob, SingleProcess, load_rgb, run_image_job
from popalign.io import atomic_write_csv
from popalign.locks import output_lock



@dataclass(frozen=True)
class LabellingSummary:
    labels_path: Path
    images: int
    faces_detected: int

    @property
    def detection_rate(self) -> float:
        return self.faces_detected / self.images if self.images else 0.0


def read_manifest_image_paths(out_dir: str | Path) -> list[str]:
    """The manifest's image paths, in order; every image must exist and appear once."""
    return list(read_manifest(out_dir)["image_path"])


def _labels_frame(image_paths: list[str], rows: dict[str, dict]) -> pd.DataFrame:
    records = []
    for image_path in image_paths:
        row = rows[image_path]
        record = {column: row.get(column) for column in LABEL_COLUMNS}
        record["face_detected"] = 1 if row["face_detected"] else 0
        records.append(record)
    return pd.DataFrame.from_records(records, columns=LABEL_COLUMNS)


def recorded_options(options: dict) -> dict:
    """The options a classifier was built with, as recorded beside its labels (where it runs is not recorded)."""
    return json.loads(json.dumps({key: value for key, value in options.items() if key != "device"}, sort_keys=True, default=str))


def complete_labels(out_dir: str | Path, classifier_name: str, options: dict, image_paths: list[str]) -> Optional[LabellingSummary]:
    """The summary of labels_<name>.csv when it covers exactly these images and was made with these options, else
    None: a finished folder is not classified again, and its model is not even loaded."""
    final_path = labels_path(out_dir, classifier_name)
    written = ImageJob(Path(out_dir), f"labels_{classifier_name}").complete_output(final_path, recorded_options(options), image_paths)
    return None if written is None else LabellingSummary(final_path, len(written), int((written["face_detected"] == "1").sum()))


def classify_image_folder(out_dir: str | Path, classifier: Classifier, batch_size: int = 16, accelerator=None,
                          options: dict | None = None) -> LabellingSummary:
    """Classify the images of `out_dir` not classified yet, then write labels_<name>.csv.

    `accelerator` is an `accelerate.Accelerator` (or anything with process_index,
    num_processes, is_main_process and wait_for_everyone); None runs in this process alone.
    `options`: what the classifier was built with, recorded with its settings. Every process must call this.
    Returns the counts of the whole folder.
    """
    process = accelerator if accelerator is not None else SingleProcess()
    out_dir = Path(out_dir)
    image_paths = read_manifest_image_paths(out_dir)
    with output_lock(out_dir, f"labels_{classifier.name}", take=process.is_main_process):  # one run per labels file
        job = ImageJob(out_dir, f"labels_{classifier.name}")
        settings = json.loads(json.dumps({"classifier": classifier.name, "settings": classifier.settings,
                                          "options": recorded_options(options or {})}))
        # What the classifier does is compared; the options it was built with are recorded (complete_labels reads them).
        job.check_settings(settings, lambda saved: (
            f"labels in {out_dir} were started with settings {saved['settings']}, not {settings['settings']}; "
            f"use the same settings or delete {out_dir}/.labels_{classifier.name}.*"), ignored=("options",))

        def classify_batch(batch_paths: list[str]) -> list[dict]:
            classifications = classifier.classify([load_rgb(out_dir / image_path) for image_path in batch_paths])
            return [{**asdict(classification), "classifier": classifier.name} for classification in classifications]

        rows = run_image_job(job, image_paths, settings, classify_batch, batch_size, process, f"classify ({classifier.name})")
        labels = _labels_frame(image_paths, rows)
        summary = LabellingSummary(labels_path(out_dir, classifier.name), len(labels), int(labels["face_detected"].sum()))
        if process.is_main_process:
            atomic_write_csv(summary.labels_path, labels)
            tqdm.write(
                f"{summary.images} images, face detected in {summary.faces_detected} "
                f"({summary.detection_rate:.1%}) -> {summary.labels_path}"
            )
            if summary.images and summary.faces_detected == 0:
                warn_no_face(out_dir, classifier.name, summary.images)
    # No process returns before the labels file exists.
    process.wait_for_everyone()
    return summary


def warn_no_face(out_dir: Path, classifier_name: str, images: int) -> None:
    """A folder where no image shows a face is written (a folder of scenery prompts may rightly have none), but said
    loudly, on one line: for people prompts it means the model drew no people (or nothing), or the detector fails."""
    print(f"warning: {out_dir}: no face found in any of its {images} images by the {classifier_name} classifier; check that "
          "the model draws people (step 3 and the evaluation count only images with a face)", file=sys.stderr, flush=True)


# The defaults of `python -m popalign.classify`, also those of the training-time validation's classifier.
DEFAULT_DETECTOR = "yunet"  # the original's (downloads its weights; fastmtcnn ships with facenet-pytorch)
DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
DEFAULT_FACE_THRESHOLD = 0.5


def classifier_options(classifier_name: str, detector_backend: str = DEFAULT_DETECTOR, clip_model: str = DEFAULT_CLIP_MODEL,
                       face_threshold: float = DEFAULT_FACE_THRESHOLD, device: str | None = None) -> dict:
    """The command-line options that apply to the chosen backend."""
    if classifier_name == "deepface":
        return {"detector_backend": detector_backend, "device": device}
    if classifier_name == "clip":
        return {"model": clip_model, "face_threshold": face_threshold, "device": device}
    if classifier_name in ("toy", "age_gender"):
        return {}
    raise ValueError(f"unknown classifier {classifier_name!r}")


def run_classification(out_dir: str | Path, classifier_name: str, options: dict, batch_size: int, accelerator=None) -> LabellingSummary:
    """Check the folder, build the classifier once, classify. Fails on a bad manifest before loading models; a
    folder whose labels are complete, with these options, is left as it is without loading the model."""
    image_paths = read_manifest_image_paths(out_dir)
    done = complete_labels(out_dir, classifier_name, options, image_paths)
    if done is not None:
        process = accelerator if accelerator is not None else SingleProcess()
        if process.is_main_process:
            tqdm.write(f"{done.labels_path} is complete ({done.images} images, face detected in {done.faces_detected}), skipping")
        return done
    classifier = build_classifier(classifier_name, **options)
    return classify_image_folder(out_dir, classifier, batch_size, accelerator, options=options)
