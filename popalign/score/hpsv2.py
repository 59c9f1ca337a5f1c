"""HPSv2 (Human Preference Score v2): open_clip ViT-H-14 fine-tuned on human preferences.

    score_i = cos(image_features_i, text_features_i)

The same model the `hpsv2` package scores with (open_clip ViT-H-14 with an HPS checkpoint from
hub repo xswu/HPSv2), run through open_clip directly: the package pins pytest 7.2 and protobuf<4,
its wheel lacks its BPE file, and its score() reloads the checkpoint on every call. HPSv2.0 and
HPSv2.1 scores are not comparable, so the version is part of the description.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torchvision import transforms

from popalign.score.base import QualityScorer, paired_cosine, resolve_device, resolve_dtype
from popalign.score.checkpoints import load_torch_checkpoint, local_or_hub_file

# version -> checkpoint file in hub repo xswu/HPSv2 (as the hpsv2 package names them).
HPS_CHECKPOINTS = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def hps_preprocess(image_size: int, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD) -> transforms.Compose:
    """The evaluation transform of the hpsv2 package: RGB, to tensor, bicubic resize of the short
    side, centre crop, normalise. (It resizes the tensor, not the PIL image as open_clip does.)"""
    return transforms.Compose([
        transforms.Lambda(lambda image: image.convert("RGB")),
        transforms.ToTensor(),
        transforms.Resize(image_size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(image_size),
        transforms.Normalize(mean, std),
    ])


class HPSv2Scorer(QualityScorer):
    """HPSv2 score with open_clip `model_name` and the HPS checkpoint of `version`.

    `checkpoint` is a local file; when None, HPS_CHECKPOINTS[version] is fetched from `hub_repo`.
    """

    name = "hpsv2"

    def __init__(self, version: str = "v2.1", checkpoint: str | None = None, hub_repo: str = "xswu/HPSv2",
                 model_name: str = "ViT-H-14", device: str | None = None, dtype: str = "auto", batch_size: int = 8):
        import open_clip

        super().__init__(batch_size)
        if version not in HPS_CHECKPOINTS:
            raise ValueError(f"unknown HPS version {version!r} (known: {', '.join(HPS_CHECKPOINTS)})")
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        checkpoint_path = local_or_hub_file(checkpoint, hub_repo, HPS_CHECKPOINTS[version])
        # Architecture only (random init); the HPS checkpoint holds every weight.
        self.model = open_clip.create_model(model_name, pretrained=None, load_weights=False, device="cpu")
        state = load_torch_checkpoint(checkpoint_path)
        self.model.load_state_dict(state["state_dict"] if "state_dict" in state else state)
        self.model.to(self.device, self.dtype).eval()
        self.tokenizer = open_clip.get_tokenizer(model_name)
        visual = self.model.visual
        image_size = visual.image_size[0] if isinstance(visual.image_size, (tuple, list)) else visual.image_size
        self.preprocess = hps_preprocess(image_size, getattr(visual, "image_mean", None) or OPENAI_CLIP_MEAN,
                                         getattr(visual, "image_std", None) or OPENAI_CLIP_STD)
        self.description = f"HPSv{version[1:]} (open_clip {model_name} + {Path(checkpoint_path).name})"

    @torch.no_grad()
    def features(self, images: list[Image.Image], prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, D) image and text features of the model (before normalisation)."""
        pixels = torch.stack([self.preprocess(image) for image in images]).to(self.device, self.dtype)
        tokens = self.tokenizer(prompts).to(self.device)
        return self.model.encode_image(pixels), self.model.encode_text(tokens)

    def score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        image_features, text_features = self.features(images, prompts)
        return paired_cosine(image_features, text_features).cpu()
