"""DeepFace backend: face detection, then DeepFace's gender and race models (as the original)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from popalign.attributes import DEFAULT_ATTRIBUTES_PATH, Attribute, load_attributes
from popalign.classify.base import NO_FACE, Classification, Classifier

# The attribute models DeepFace runs, and the attribute each one predicts. DeepFace's age model
# returns a number of years, not one of the age labels, so age is left to other backends.
_DEEPFACE_MODELS = {"gender": "Gender", "race": "Race"}
# Faces per forward of an attribute model (VGG-Face's first layers hold 64 x 224 x 224 floats, 13 MB, per face).
_FACES_PER_CALL = 32


class DeepFaceClassifier(Classifier):
    """What `DeepFace.analyze(image, actions=['gender', 'race'], detector_backend=...)` finds in each image, batched.

    Models are built once here (DeepFace keeps them in its module-level cache, which every later
    `analyze` call reuses), so a missing weight or detector file fails before any image is read.
    An image where the detector finds no face gives face_detected=False; every other error
    propagates. Weights are read from `$DEEPFACE_HOME/.deepface/weights`.
    """

    name = "deepface"

    def __init__(
        self,
        detector_backend: str = "yunet",
        device: str | None = None,
        align: bool = True,
        attributes_path=DEFAULT_ATTRIBUTES_PATH,
    ):
        from deepface.modules import modeling

        self.detector_backend = detector_backend
        self.align = align
        attributes = load_attributes(attributes_path)
        self._gender = attributes["gender"]
        self._race = attributes["race"]
        if detector_backend != "skip":  # 'skip' has no detector model: the whole image is the face
            modeling.build_model(task="face_detector", model_name=detector_backend)
        for model_name in _DEEPFACE_MODELS.values():
            client = modeling.build_model(task="facial_attribute", model_name=model_name)
            if device is not None:
                # DeepFace puts every model on cuda:0; under multi-GPU launches each process
                # must use its own device instead.
                import torch

                client.device = torch.device(device)
                client.model.to(client.device)

    @property
    def settings(self) -> dict:
        return {"detector_backend": self.detector_backend, "align": self.align}

    def classify(self, images: list[Image.Image]) -> list[Classification]:
        """Detection image by image (DeepFace's detectors take one image), then each attribute model once over the
        subject faces of the whole batch. Equal, within float rounding, to `DeepFace.analyze(image, ...)` per image."""
        from deepface.modules import modeling

        subjects = [self._subject(image) for image in images]
        found = [subject for subject in subjects if subject is not None]
        if not found:
            return [NO_FACE] * len(images)
        faces = np.concatenate([pixels for pixels, _ in found])  # (n, 224, 224, 3), as analyze feeds each model
        predictions = {}
        for action, model_name in _DEEPFACE_MODELS.items():
            model = modeling.build_model(task="facial_attribute", model_name=model_name)
            # at most _FACES_PER_CALL faces per forward: a large --batch_size does not grow the activations without bound
            predictions[action] = np.concatenate([
                np.asarray(model.predict(faces[start:start + _FACES_PER_CALL])).reshape(len(faces[start:start + _FACES_PER_CALL]), -1)
                for start in range(0, len(faces), _FACES_PER_CALL)])  # one face gives (classes,)
        readings = iter([
            classification_from_analysis([analysis_of(predictions["gender"][index], predictions["race"][index], region)],
                                         self._gender, self._race)
            for index, (_, region) in enumerate(found)
        ])
        return [NO_FACE if subject is None else next(readings) for subject in subjects]

    def _subject(self, image: Image.Image):
        """The largest face's model input (1, 224, 224, 3) and its region, as `DeepFace.analyze` prepares them, or None
        when the detector finds no face."""
        from deepface.modules import detection, preprocessing
        from deepface.modules.exceptions import FaceNotDetected

        # DeepFace expects a BGR array (OpenCV's channel order).
        bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
        try:
            faces = detection.extract_faces(img_path=bgr, detector_backend=self.detector_backend, enforce_detection=True,
                                            grayscale=False, align=self.align, expand_percentage=0, anti_spoofing=False)
        except FaceNotDetected:
            return None
        faces = [face for face in faces if face["face"].shape[0] and face["face"].shape[1]]
        if not faces:
            return None
        # Generated images usually hold one person; the largest face is the subject (the first of equal ones).
        face = max(faces, key=lambda found: found["facial_area"]["w"] * found["facial_area"]["h"])
        pixels = preprocessing.resize_image(img=face["face"][:, :, ::-1], target_size=(224, 224))  # RGB -> BGR
        return pixels, face["facial_area"]


def analysis_of(gender_probabilities, race_probabilities, region: dict) -> dict:
    """One face's entry of `DeepFace.analyze`'s result, from its gender and race model outputs (the same arithmetic)."""
    from deepface.models.demography.DemographyUtils import GENDER_LABELS, RACE_LABELS

    race_total = race_probabilities.sum()
    return {
        "gender": {label: 100 * gender_probabilities[index] for index, label in enumerate(GENDER_LABELS)},
        "dominant_gender": GENDER_LABELS[int(np.argmax(gender_probabilities))],
        "race": {label: 100 * race_probabilities[index] / race_total for index, label in enumerate(RACE_LABELS)},
        "dominant_race": RACE_LABELS[int(np.argmax(race_probabilities))],
        "region": region,
    }


def classification_from_analysis(faces: list[dict], gender: Attribute, race: Attribute) -> Classification:
    """Turn `DeepFace.analyze`'s per-face results into one Classification for the image.

    Labels are mapped to attribute labels (Man -> male); scores are DeepFace's percentage for
    the dominant label divided by 100.
    """
    if not faces:
        return NO_FACE
    # Generated images usually hold one person; when the detector finds several faces, the
    # largest one is taken as the image's subject (background faces are smaller).
    face = max(faces, key=lambda found: found["region"]["w"] * found["region"]["h"])
    gender_label, race_label = face["dominant_gender"], face["dominant_race"]
    return Classification(
        face_detected=True,
        gender=gender.map_classifier_label(gender_label),
        gender_score=_percent_to_probability(face["gender"][gender_label]),
        race=race.map_classifier_label(race_label),
        race_score=_percent_to_probability(face["race"][race_label]),
    )


def _percent_to_probability(percent) -> float:
    """DeepFace reports percentages; clip the float32 rounding that can pass 100 by a hair."""
    return float(min(max(float(percent) / 100.0, 0.0), 1.0))
