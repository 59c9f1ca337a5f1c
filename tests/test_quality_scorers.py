"""The five quality scorers on tiny random-weight checkpoints saved where their loaders look.

Every scorer runs its real loading and scoring code; the expected values are recomputed here
from the same saved weights by a separate route (the model's raw features and the formula).
"""

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from popalign.score import SCORERS, build_scorer
from popalign.score.aesthetic import AestheticMLP, aesthetic_score
from popalign.score.base import paired_cosine
from popalign.score.clip_score import clip_score
from popalign.score.pickscore import pick_score
from popalign.score.tiny import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, build_tiny_scorer_assets

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPTS = ["a photo of a doctor reading", "a nurse in a hospital", "a red house", "a chef in a kitchen"]
FIVE_SCORERS = ["hpsv2", "pickscore", "clip", "aesthetic", "imagereward"]


@pytest.fixture(scope="session")
def tiny_scorer_options(tmp_path_factory):
    return build_tiny_scorer_assets(tmp_path_factory.mktemp("tiny_scorers"))


@pytest.fixture(scope="session")
def tiny_scorers(tiny_scorer_options):
    """Each scorer built once, with batches of 3 so that 4 pairs span two batches."""
    return {name: build_scorer(name, batch_size=3, device="cpu", **tiny_scorer_options[name]) for name in FIVE_SCORERS}


def random_images(count, seed=0, size=(40, 48)):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(count)]


# --- registry ---------------------------------------------------------------------------------

def test_registry_names_and_unknown_scorer():
    assert set(SCORERS) == {"hpsv2", "pickscore", "clip", "aesthetic", "imagereward", "toy"}
    assert SCORERS["toy"] == "popalign.toy.quality:ToyQualityScorer"
    with pytest.raises(ValueError, match="unknown quality scorer 'hps'.*hpsv2.*imagereward"):
        build_scorer("hps")


def test_bad_options_are_refused(tiny_scorer_options):
    with pytest.raises(ValueError, match="unknown HPS version"):
        build_scorer("hpsv2", **{**tiny_scorer_options["hpsv2"], "version": "v3"})
    with pytest.raises(ValueError, match="unknown dtype"):
        build_scorer("clip", dtype="float8", **tiny_scorer_options["clip"])
    with pytest.raises(ValueError, match="batch_size"):
        build_scorer("clip", batch_size=0, **tiny_scorer_options["clip"])
    with pytest.raises(FileNotFoundError):
        build_scorer("aesthetic", clip_model=tiny_scorer_options["aesthetic"]["clip_model"], weights="/nonexistent/weights.pth")


# --- the formulas, by hand --------------------------------------------------------------------

def test_paired_cosine_hand_computed():
    images = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    texts = torch.tensor([[4.0, 3.0], [-2.0, 0.0]])
    assert paired_cosine(images, texts).tolist() == pytest.approx([24.0 / 25.0, -1.0])


def test_clip_score_is_100_cos_clamped_at_zero():
    images = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    texts = torch.tensor([[1.0, 0.0], [-1.0, 0.2], [0.0, 5.0]])
    assert clip_score(images, texts).tolist() == pytest.approx([100.0, 0.0, 100.0 / math.sqrt(2.0)], rel=1e-6)


def test_pick_score_scales_cosine_by_exp_logit_scale():
    images, texts = torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0, 0.0]])
    assert pick_score(images, texts, torch.tensor(math.log(100.0))).item() == pytest.approx(100.0 / math.sqrt(2.0), rel=1e-5)


def test_aesthetic_mlp_matches_a_slow_loop_with_the_published_key_names():
    torch.manual_seed(0)
    mlp = AestheticMLP(8).eval()
    state = mlp.state_dict()
    assert sorted(state) == sorted(f"layers.{index}.{kind}" for index in (0, 2, 4, 6, 7) for kind in ("weight", "bias"))
    features = torch.randn(3, 8)
    fast = aesthetic_score(features, mlp)
    for row in range(3):
        hidden = [value / math.sqrt(sum(v * v for v in features[row].tolist())) for value in features[row].tolist()]
        for index in (0, 2, 4, 6, 7):  # Linear layers only: no activations, dropout off
            weight, bias = state[f"layers.{index}.weight"].tolist(), state[f"layers.{index}.bias"].tolist()
            hidden = [sum(w * h for w, h in zip(weight_row, hidden)) + b for weight_row, b in zip(weight, bias)]
        assert fast[row].item() == pytest.approx(hidden[0], rel=1e-4, abs=1e-6)


# --- every scorer on its tiny checkpoint ------------------------------------------------------

@pytest.mark.parametrize("name", FIVE_SCORERS)
def test_scorer_gives_finite_scores_in_order_that_follow_the_image(tiny_scorers, name):
    scorer = tiny_scorers[name]
    images = random_images(4)
    scores = scorer.score(images, PROMPTS)
    assert len(scores) == 4 and all(isinstance(value, float) and math.isfinite(value) for value in scores)
    # order preserved: the reversed pairs give the reversed scores
    reversed_scores = scorer.score(images[::-1], PROMPTS[::-1])
    assert reversed_scores == pytest.approx(scores[::-1], rel=1e-4, abs=1e-5)
    # batching does not change a pair's score
    one_by_one = [scorer.score([image], [prompt])[0] for image, prompt in zip(images, PROMPTS)]
    assert one_by_one == pytest.approx(scores, rel=1e-4, abs=1e-5)
    # a different image with the same prompt changes the score
    other = scorer.score(random_images(1, seed=7), PROMPTS[:1])
    assert abs(other[0] - scores[0]) > 1e-6
    assert scorer.description and scorer.name == name
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        scorer.score(images[:2], PROMPTS[:1])


def _transformers_clip_features(path, images, prompts):
    """Projected features computed straight from the saved CLIP (no scorer code)."""
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(path).eval(), CLIPProcessor.from_pretrained(path)
    with torch.no_grad():
        vision = model.vision_model(pixel_values=processor(images=images, return_tensors="pt")["pixel_values"])
        image_features = model.visual_projection(vision.pooler_output)
        tokens = processor(text=prompts, padding=True, return_tensors="pt")
        text = model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        text_features = model.text_projection(text.pooler_output)
    return model, image_features, text_features


def _cosines(image_features, text_features):
    return [float(torch.dot(x, t) / (x.norm() * t.norm())) for x, t in zip(image_features, text_features)]


def test_clip_score_equals_max_100_cos_0_from_the_models_features(tiny_scorers, tiny_scorer_options):
    images = random_images(4, seed=1)
    _, image_features, text_features = _transformers_clip_features(tiny_scorer_options["clip"]["model"], images, PROMPTS)
    expected = [max(100.0 * cosine, 0.0) for cosine in _cosines(image_features, text_features)]
    assert tiny_scorers["clip"].score(images, PROMPTS) == pytest.approx(expected, rel=1e-4, abs=1e-4)
    assert "openai" not in tiny_scorers["clip"].description and "max(100*cos, 0)" in tiny_scorers["clip"].description


def test_pickscore_equals_exp_logit_scale_times_cos(tiny_scorers, tiny_scorer_options):
    images = random_images(4, seed=2)
    model, image_features, text_features = _transformers_clip_features(tiny_scorer_options["pickscore"]["model"], images, PROMPTS)
    scale = math.exp(model.logit_scale.item())
    expected = [scale * cosine for cosine in _cosines(image_features, text_features)]
    assert tiny_scorers["pickscore"].score(images, PROMPTS) == pytest.approx(expected, rel=1e-4, abs=1e-5)


def test_aesthetic_is_the_mlp_of_the_normalised_image_embedding(tiny_scorers, tiny_scorer_options):
    images = random_images(3, seed=3)
    _, image_features, _ = _transformers_clip_features(tiny_scorer_options["aesthetic"]["clip_model"], images, PROMPTS[:3])
    state = torch.load(tiny_scorer_options["aesthetic"]["weights"], weights_only=True)
    hidden = torch.nn.functional.normalize(image_features, dim=-1)
    for index in (0, 2, 4, 6, 7):
        hidden = hidden @ state[f"layers.{index}.weight"].T + state[f"layers.{index}.bias"]
    assert tiny_scorers["aesthetic"].score(images, ["ignored"] * 3) == pytest.approx(hidden[:, 0].tolist(), rel=1e-4, abs=1e-5)


def test_aesthetic_ignores_the_prompt(tiny_scorers):
    images = random_images(2, seed=4)
    assert tiny_scorers["aesthetic"].score(images, PROMPTS[:2]) == tiny_scorers["aesthetic"].score(images, ["x", "y"])


def test_hpsv2_is_the_cosine_of_open_clip_features(tiny_scorers, tiny_scorer_options):
    import open_clip

    options = tiny_scorer_options["hpsv2"]
    model = open_clip.create_model(options["model_name"], load_weights=False)
    model.load_state_dict(torch.load(options["checkpoint"], weights_only=True)["state_dict"])
    model.eval()
    # 32x32 images need no resize or crop, so preprocessing is to-tensor and normalise
    images = random_images(3, seed=5, size=(32, 32))
    mean, std = np.array(OPENAI_CLIP_MEAN), np.array(OPENAI_CLIP_STD)
    pixels = torch.tensor(np.stack([((np.asarray(image) / 255.0 - mean) / std).transpose(2, 0, 1) for image in images]),
                          dtype=torch.float32)
    with torch.no_grad():
        image_features = model.encode_image(pixels)
        text_features = model.encode_text(open_clip.tokenize(PROMPTS[:3]))
    expected = _cosines(image_features, text_features)
    assert tiny_scorers["hpsv2"].score(images, PROMPTS[:3]) == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert tiny_scorers["hpsv2"].description.startswith("HPSv2.1 (open_clip ")


def test_hpsv2_preprocessing_crops_any_image_to_the_model_size(tiny_scorers):
    pixels = tiny_scorers["hpsv2"].preprocess(random_images(1, size=(90, 50))[0])
    assert tuple(pixels.shape) == (3, 32, 32)


def test_imagereward_batched_scores_equal_the_packages_single_image_score(tiny_scorers):
    """score_batch (the package's batched score_gard) against ImageReward.score, the package's
    own per-image path with its own tokenisation and preprocessing."""
    model = tiny_scorers["imagereward"].model
    images = random_images(4, seed=6)
    expected = [model.score(prompt, image) for prompt, image in zip(PROMPTS, images)]
    assert tiny_scorers["imagereward"].score(images, PROMPTS) == pytest.approx(expected, rel=1e-4, abs=1e-5)


def test_imagereward_normalises_the_head_output_with_the_packages_constants(tiny_scorers):
    scorer = tiny_scorers["imagereward"]
    model = scorer.model
    image, prompt = random_images(1, seed=8)[0], PROMPTS[0]
    tokens = model.blip.tokenizer([prompt], padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    with torch.no_grad():
        image_embeds = model.blip.visual_encoder(model.preprocess(image).unsqueeze(0))
        text = model.blip.text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask, encoder_hidden_states=image_embeds,
                                       encoder_attention_mask=torch.ones(image_embeds.shape[:2], dtype=torch.long), return_dict=True)
        head = model.mlp(text.last_hidden_state[:, 0, :]).item()
    assert model.mean == pytest.approx(0.16717362830052426) and model.std == pytest.approx(1.0333394966054072)
    assert scorer.score([image], [prompt])[0] == pytest.approx((head - model.mean) / model.std, rel=1e-4, abs=1e-5)


def test_imagereward_refuses_a_checkpoint_without_the_reward_head(tiny_scorer_options, tmp_path):
    options = dict(tiny_scorer_options["imagereward"])
    state = torch.load(options["checkpoint"], weights_only=True)
    headless = tmp_path / "headless.pt"
    torch.save({key: value for key, value in state.items() if not key.startswith("mlp.")}, headless)
    with pytest.raises(ValueError, match="parameter\\(s\\) missing, e.g. mlp."):
        build_scorer("imagereward", **{**options, "checkpoint": str(headless)})


def test_reduced_precision_is_close_to_float32(tiny_scorer_options, tiny_scorers):
    images = random_images(3, seed=9)
    half = build_scorer("clip", dtype="bfloat16", device="cpu", **tiny_scorer_options["clip"])
    assert half.clip.model.dtype == torch.bfloat16
    assert half.score(images, PROMPTS[:3]) == pytest.approx(tiny_scorers["clip"].score(images, PROMPTS[:3]), rel=0.05, abs=1.0)


def _import_hpsv2_reference(monkeypatch):
    """The hpsv2 package's own open_clip fork, as installed with --no-deps. Two packaging gaps are
    bridged for the import only: its `clint` dependency (a download progress bar, unused here)
    and the BPE file its wheel lacks (open_clip ships the same file)."""
    import gzip
    import sys
    import types

    from popalign.tiny_models import open_clip_bpe_path

    textui = types.ModuleType("clint.textui")
    textui.progress = None
    monkeypatch.setitem(sys.modules, "clint", types.SimpleNamespace(textui=textui))
    monkeypatch.setitem(sys.modules, "clint.textui", textui)
    real_gzip_open = gzip.open
    monkeypatch.setattr(gzip, "open", lambda path, *args, **kwargs: real_gzip_open(
        open_clip_bpe_path() if str(path).endswith("bpe_simple_vocab_16e6.txt.gz") else path, *args, **kwargs))
    import hpsv2.src.open_clip as reference

    return reference


def test_hpsv2_matches_the_hpsv2_packages_own_model_and_preprocessing(tiny_scorers, tiny_scorer_options, tmp_path, monkeypatch):
    """The score of the hpsv2 package's img_score.score() (its model class, val transform and
    tokenizer: features of model(image, text), diagonal of image @ text.T) on the same weights."""
    reference = _import_hpsv2_reference(monkeypatch)
    config = json.loads(Path(tiny_scorer_options["hpsv2"]["model_name"].removeprefix("local-dir:"), "open_clip_config.json").read_text())
    (tmp_path / "tiny-hps-reference.json").write_text(json.dumps(config["model_cfg"]))
    reference.add_model_config(tmp_path)
    model, _, preprocess_val = reference.create_model_and_transforms("tiny-hps-reference", None, device="cpu", output_dict=True)
    model.load_state_dict(torch.load(tiny_scorer_options["hpsv2"]["checkpoint"], weights_only=True)["state_dict"])
    model.eval()
    tokenizer = reference.get_tokenizer("tiny-hps-reference")
    images = random_images(3, seed=11, size=(70, 45))  # not square: resize and crop matter
    expected = []
    with torch.no_grad():
        for image, prompt in zip(images, PROMPTS):
            outputs = model(preprocess_val(image).unsqueeze(0), tokenizer([prompt]))
            expected.append(torch.diagonal(outputs["image_features"] @ outputs["text_features"].T).item())
    assert tiny_scorers["hpsv2"].score(images, PROMPTS[:3]) == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_scorer_checkpoints_load_tensors_and_never_run_code(tmp_path):
    import argparse

    from popalign.io import InputError
    from popalign.score.checkpoints import InertObject, load_torch_checkpoint

    marker = tmp_path / "payload_ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    # Training arguments pickled beside the weights (as some published checkpoints do) become inert stand-ins.
    with_arguments = tmp_path / "with_arguments.pt"
    torch.save({"state_dict": {"weight": torch.arange(3.0)}, "args": argparse.Namespace(lr=1)}, with_arguments)
    loaded = load_torch_checkpoint(str(with_arguments))
    assert torch.equal(loaded["state_dict"]["weight"], torch.arange(3.0)) and isinstance(loaded["args"], InertObject)
    # A payload is refused, and does not run.
    poisoned = tmp_path / "poisoned.pt"
    torch.save({"state_dict": {"weight": torch.ones(1)}, "extra": Payload()}, poisoned)
    with pytest.raises(InputError, match="poisoned.pt: refusing to load"):
        load_torch_checkpoint(str(poisoned))
    assert not marker.exists()
