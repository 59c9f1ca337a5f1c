"""Step 2b: classify generated images (face found?, gender, race, age) with a chosen backend.

Backends are imported only when built, so that choosing one never imports another's heavy
dependencies (DeepFace creates folders under $DEEPFACE_HOME as soon as it is imported).
"""

from __future__ import annotations

from popalign.classify.base import Classification, Classifier
from popalign.registry import build_registered

# name -> "module:class"; the class is built with the options given to build_classifier.
CLASSIFIERS = {
    "deepface": "popalign.classify.deepface_backend:DeepFaceClassifier",
    "clip": "popalign.classify.clip_backend:ClipZeroShotClassifier",
    "toy": "popalign.toy.classifier:ToyClassifier",
    "age_gender": "popalign.classify.age_gender_backend:AgeGenderClassifier",
}


def build_classifier(name: str, **options) -> Classifier:
    """Build the classifier registered under `name` (a key of CLASSIFIERS) with its options."""
    return build_registered(CLASSIFIERS, name, "classifier", **options)


__all__ = ["CLASSIFIERS", "Classification", "Classifier", "build_classifier"]
