"""DeepFace backend: the real `DeepFace.analyze` path with random-weight gender and race models.

DeepFace reads its weights from $DEEPFACE_HOME/.deepface/weights; the fixture writes random
state dicts of DeepFace's own model classes there (no download), and uses the OpenCV Haar
detector, which ships with opencv (the default yunet detector needs a downloaded ONNX file).
"""

import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from popalign.attributes import load_attributes
from popalign.classify import build_classifier
from popalign.classify.base import NO_FACE, Classification
from popalign.classify.deepface_backend import DeepFaceClassifier, classification_from_analysis

ATTRIBUTES = load_attributes()


@pytest.fixture(scope="session")
def deepface_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("deepface_home")
    previous = os.environ.get("DEEPFACE_HOME")
    os.environ["DEEPFACE_HOME"] = str(home)  # before deepface is first imported: it creates the folder on import
    from deepface.models.demography.pytorch import Gender, Race

    weights = home / ".deepface" / "weights"
    weights.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.save(Gender.base_model().state_dict(), weights / "gender_model_weights.pth")
    torch.save(Race.base_model().state_dict(), weights / "race_model_single_batch.pth")
    yield home
    shutil.rmtree(weights)  # 1 GB of random weights; pytest keeps old temp folders around
    if previous is None:
        os.environ.pop("DEEPFACE_HOME", None)
    else:
        os.environ["DEEPFACE_HOME"] = previous


@pytest.fixture(scope="session")
def deepface_classifier(deepface_home):
    return build_classifier("deepface", detector_backend="opencv", device="cpu")


def test_real_face_detected_and_blank_image_kept_as_no_face(deepface_classifier):
    from deepface.modules import modeling
    from skimage.data import astronaut

    # built when the classifier was made, before any image: reused by every analyze call
    built = {name: modeling.cached_models["facial_attribute"][name] for name in ("Gender", "Race")}
    built["opencv"] = modeling.cached_models["face_detector"]["opencv"]

    face_photo = Image.fromarray(astronaut())
    blank = Image.new("RGB", (256, 256), (255, 255, 255))
    face_result, blank_result = deepface_classifier.classify([face_photo, blank])

    assert face_result.face_detected is True
    assert face_result.gender in ATTRIBUTES["gender"].labels
    assert face_result.race in ATTRIBUTES["race"].labels
    # The score is the probability of the dominant label: at least 1/K of K classes.
    assert 0.5 <= face_result.gender_score <= 1.0
    assert 1 / 6 <= face_result.race_score <= 1.0
    assert face_result.age is None and face_result.age_score is None

    assert blank_result == Classification(False, None, None, None, None, None, None)

    assert modeling.cached_models["facial_attribute"]["Gender"] is built["Gender"]
    assert modeling.cached_models["facial_attribute"]["Race"] is built["Race"]
    assert modeling.cached_models["face_detector"]["opencv"] is built["opencv"]


def test_errors_other_than_no_face_propagate(deepface_classifier, monkeypatch):
    from deepface.modules import detection

    def broken_detector(*args, **kwargs):
        raise ValueError("weights file is corrupt")

    monkeypatch.setattr(detection, "extract_faces", broken_detector)
    with pytest.raises(ValueError, match="corrupt"):
        deepface_classifier.classify([Image.new("RGB", (64, 64))])


def _photographs_for_batching():
    """Real photographs with a face (the astronaut; Grace Hopper), two faces of two sizes side by side, images with none."""
    import matplotlib.cbook
    from skimage.data import astronaut, coffee

    photo = astronaut()
    with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")) as hopper:
        hopper = hopper.convert("RGB")
    two = Image.new("RGB", (768, 512))
    two.paste(Image.fromarray(photo[::2, ::2]), (0, 128))
    two.paste(Image.fromarray(photo), (256, 0))
    return [Image.fromarray(photo), Image.new("RGB", (256, 256), (255, 255, 255)), hopper, Image.fromarray(coffee()), two]


def test_batch_equals_deepface_analyze_one_image_at_a_time(deepface_classifier, monkeypatch):
    """One batch (every subject face through each attribute model at once) == DeepFace.analyze on each image alone."""
    from deepface import DeepFace
    from deepface.modules.exceptions import FaceNotDetected

    images = _photographs_for_batching()
    batched = deepface_classifier.classify(images)
    faces_found = 0
    for image, result in zip(images, batched):
        try:
            analysis = DeepFace.analyze(np.ascontiguousarray(np.asarray(image)[:, :, ::-1]), actions=["gender", "race"],
                                        detector_backend="opencv", enforce_detection=True, align=True, silent=True)
        except FaceNotDetected:
            analysis = []
        expected = classification_from_analysis(analysis, ATTRIBUTES["gender"], ATTRIBUTES["race"])
        assert (result.face_detected, result.gender, result.race) == (expected.face_detected, expected.gender, expected.race)
        for field in ("gender_score", "race_score"):
            assert getattr(result, field) == pytest.approx(getattr(expected, field), abs=1e-5)
        faces_found += result.face_detected
    assert faces_found == 3 and not batched[1].face_detected and not batched[3].face_detected
    # with the faces split over several forwards (2 + 1), the same
    from popalign.classify import deepface_backend

    monkeypatch.setattr(deepface_backend, "_FACES_PER_CALL", 2)
    again = deepface_classifier.classify(images)
    for result, first in zip(again, batched):
        assert (result.face_detected, result.gender, result.race) == (first.face_detected, first.gender, first.race)
        if result.face_detected:
            assert (result.gender_score, result.race_score) == (pytest.approx(first.gender_score, abs=1e-5),
                                                                pytest.approx(first.race_score, abs=1e-5))
    assert deepface_classifier.classify([]) == []


def test_unknown_detector_fails_when_built(deepface_home):
    with pytest.raises(ValueError, match="no-such-detector"):
        DeepFaceClassifier(detector_backend="no-such-detector")


def _face(x, w, gender, gender_percent, race, race_percent):
    other_gender = "Woman" if gender == "Man" else "Man"
    return {
        "region": {"x": x, "y": 0, "w": w, "h": w},
        "dominant_gender": gender,
        "gender": {gender: gender_percent, other_gender: 100.0 - gender_percent},
        "dominant_race": race,
        "race": {race: race_percent},
    }


def test_largest_face_is_the_subject_and_labels_map_exactly():
    small = _face(0, 20, "Man", 90.0, "asian", 40.0)
    large = _face(100, 80, "Woman", 70.0, "latino hispanic", 55.0)
    result = classification_from_analysis([small, large], ATTRIBUTES["gender"], ATTRIBUTES["race"])
    assert result == Classification(True, "female", pytest.approx(0.70), "latino hispanic", pytest.approx(0.55))
    result = classification_from_analysis([small], ATTRIBUTES["gender"], ATTRIBUTES["race"])
    assert (result.gender, result.race) == ("male", "asian")
    # float32 rounding can put DeepFace's percentage a hair above 100
    assert classification_from_analysis([_face(0, 9, "Man", 100.00001, "white", 100.0)], ATTRIBUTES["gender"], ATTRIBUTES["race"]).gender_score == 1.0
    assert classification_from_analysis([], ATTRIBUTES["gender"], ATTRIBUTES["race"]).face_detected is False


def test_gender_mapping_is_exact_never_substring():
    gender = ATTRIBUTES["gender"]
    assert gender.map_classifier_label("Man") == "male"
    assert gender.map_classifier_label("Woman") == "female"
    assert gender.map_classifier_label("female") == "female"  # 'male' is inside 'female'
    for raw in ("Female person", "fe", "man", "Males"):
        with pytest.raises(ValueError):
            gender.map_classifier_label(raw)


@pytest.mark.parametrize("detector", ["fastmtcnn", "opencv"])
def test_real_detector_weights_on_real_photographs(deepface_home, detector):
    """facenet-pytorch's MTCNN (DeepFace's fastmtcnn) and OpenCV's Haar cascade: real weights, no download."""
    from popalign.classify.photographs import detect_in_photographs, detection_table

    detections = {detection.name: detection for detection in detect_in_photographs(detector)}
    # No face is reported where there is none: a cup, a cat, a rocket, coins, a blank image, noise.
    for name in ["coffee", "cat (chelsea)", "rocket", "blank", "noise"]:
        assert detections[name].faces == [], (detector, name)
    # The astronaut's face, where it is in the photograph (a box around x 180-270, y 60-170 of 512 px).
    astronaut = detections["astronaut"].faces
    assert len(astronaut) == 1
    centre_x = astronaut[0]["x"] + astronaut[0]["w"] / 2
    centre_y = astronaut[0]["y"] + astronaut[0]["h"] / 2
    assert 180 < centre_x < 270 and 60 < centre_y < 170
    if detector == "fastmtcnn":
        assert astronaut[0]["confidence"] > 0.99
        # Mirrored, at a quarter of the size, and the greyscale cameraman: MTCNN finds all four faces.
        assert all(detection.faces for detection in detections.values() if detection.has_face)
        assert "faces found in 4 of 4 photographs with a face (100%); a face reported in 0 of 6" in \
            detection_table(list(detections.values()), detector)


def test_classifier_with_the_real_mtcnn_detector(deepface_home):
    from skimage.data import astronaut, coffee

    classifier = build_classifier("deepface", detector_backend="fastmtcnn", device="cpu")
    face_result, cup_result = classifier.classify([Image.fromarray(astronaut()), Image.fromarray(coffee())])
    assert face_result.face_detected and face_result.gender in ("male", "female")
    assert face_result.race in ATTRIBUTES["race"].labels
    assert cup_result == NO_FACE
