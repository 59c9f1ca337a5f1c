"""CLIP zero-shot backend on a tiny random transformers CLIP saved to disk and loaded by path."""

import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from popalign.attributes import load_attributes
from popalign.classify import build_classifier
from popalign.classify.clip_backend import FACE_PROMPTS, ClipZeroShotClassifier, attribute_prompts, zero_shot_probabilities

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _random_images(count, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)) for _ in range(count)]


def test_zero_shot_probabilities_hand_computed():
    image = torch.tensor([[2.0, 0.0]])  # normalised: (1, 0)
    texts = torch.tensor([[1.0, 0.0], [0.0, 3.0]])  # cosines 1 and 0
    expected_first = math.exp(10.0) / (math.exp(10.0) + 1.0)
    probabilities = zero_shot_probabilities(image, texts, logit_scale=10.0)
    assert probabilities.shape == (1, 2)
    assert probabilities[0, 0].item() == pytest.approx(expected_first, rel=1e-6)
    assert probabilities[0, 1].item() == pytest.approx(1.0 - expected_first, rel=1e-5)


def test_zero_shot_probabilities_match_a_slow_loop():
    generator = torch.Generator().manual_seed(0)
    images, texts = torch.randn(4, 8, generator=generator), torch.randn(3, 8, generator=generator)
    fast = zero_shot_probabilities(images, texts, logit_scale=7.5)
    for i in range(4):
        logits = []
        for k in range(3):
            cosine = sum(images[i, d] * texts[k, d] for d in range(8)) / (images[i].norm() * texts[k].norm())
            logits.append(7.5 * float(cosine))
        total = sum(math.exp(value) for value in logits)
        for k in range(3):
            assert fast[i, k].item() == pytest.approx(math.exp(logits[k]) / total, rel=1e-5)


def test_prompts_use_prompt_words_with_the_right_article():
    attributes = load_attributes()
    assert attribute_prompts(attributes["race"].prompt_words)[:2] == ["a photo of a white person", "a photo of an Asian person"]
    assert attribute_prompts(attributes["gender"].prompt_words) == ["a photo of a male person", "a photo of a female person"]
    assert attribute_prompts(attributes["age"].prompt_words) == [
        "a photo of a young person", "a photo of a middle-aged person", "a photo of a very old person",
    ]


def test_clip_backend_matches_clip_forward_pass(tiny_clip_path):
    """The backend's labels and scores equal softmax(logits_per_image) of the model's own forward."""
    from transformers import CLIPModel, CLIPProcessor

    classifier = build_classifier("clip", model=str(tiny_clip_path), face_threshold=0.0, device="cpu")
    assert isinstance(classifier, ClipZeroShotClassifier)
    images = _random_images(3)
    results = classifier.classify(images)
    assert len(results) == 3

    model, processor = CLIPModel.from_pretrained(tiny_clip_path).eval(), CLIPProcessor.from_pretrained(tiny_clip_path)
    attributes = load_attributes()
    with torch.no_grad():
        for name in ("gender", "race", "age"):
            prompts = attribute_prompts(attributes[name].prompt_words)
            inputs = processor(text=prompts, images=images, return_tensors="pt", padding=True)
            probabilities = model(**inputs).logits_per_image.softmax(dim=-1)
            for result, row in zip(results, probabilities):
                assert result.face_detected is True
                assert getattr(result, name) == attributes[name].labels[int(row.argmax())]
                assert getattr(result, f"{name}_score") == pytest.approx(float(row.max()), abs=1e-5)
                assert 0.0 <= getattr(result, f"{name}_score") <= 1.0


def test_face_threshold_decides_face_detected(tiny_clip_path):
    from transformers import CLIPModel, CLIPProcessor

    images = _random_images(4, seed=1)
    model, processor = CLIPModel.from_pretrained(tiny_clip_path).eval(), CLIPProcessor.from_pretrained(tiny_clip_path)
    with torch.no_grad():
        inputs = processor(text=list(FACE_PROMPTS), images=images, return_tensors="pt", padding=True)
        face_probability = model(**inputs).logits_per_image.softmax(dim=-1)[:, 0]
    ordered = face_probability.sort().values
    # halfway between the two middle probabilities: splits these images into faces and not, none of them on the threshold
    # (where the classifier's batched float sums could land on either side)
    threshold = float((ordered[1] + ordered[2]) / 2)
    results = ClipZeroShotClassifier(str(tiny_clip_path), face_threshold=threshold, device="cpu").classify(images)
    for result, probability in zip(results, face_probability):
        assert result.face_detected == bool(probability >= threshold)
        if not result.face_detected:
            assert (result.gender, result.gender_score, result.race, result.race_score, result.age, result.age_score) == (None,) * 6
    assert {result.face_detected for result in results} == {True, False}


def test_clip_backend_rejects_unknown_attribute_and_threshold(tiny_clip_path):
    with pytest.raises(ValueError, match="subset"):
        ClipZeroShotClassifier(str(tiny_clip_path), attributes=("gender", "height"))
    with pytest.raises(ValueError, match="face_threshold"):
        ClipZeroShotClassifier(str(tiny_clip_path), face_threshold=1.5)


def test_build_classifier_unknown_name_lists_known():
    with pytest.raises(ValueError, match="deepface.*clip.*toy"):
        build_classifier("resnet")
