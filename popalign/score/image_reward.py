"""ImageReward-v1.0: BLIP (ViT-L/16 image encoder + BERT text encoder with cross-attention to the
image) and an MLP head, trained on human rankings of generated images.

    reward_i = (MLP(h_i) - mean) / std

with h_i the text encoder's [CLS] state for prompt i attending to image i, and mean / std the
package's normalising constants (ImageReward.mean, ImageReward.std). Computed by the
`image-reward` package's own model class and its batched scoring method `score_gard`.

The package's loader fetches the tokenizer `bert-base-uncased` and `med_config.json` from the
hub; here both, and the checkpoint, may be local paths, so the scorer also runs offline.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch
from PIL import Image

from popalign.score.base import QualityScorer, resolve_device, resolve_dtype
from popalign.score.checkpoints import existing_file, load_torch_checkpoint, local_or_hub_file
from popalign.score.compat import import_image_reward

# name -> checkpoint file in hub repo THUDM/ImageReward (the package's own table).
IMAGE_REWARD_CHECKPOINTS = {"ImageReward-v1.0": "ImageReward.pt"}
# ImageReward.score tokenizes prompts to this fixed length.
PROMPT_TOKENS = 35
# Parts of the model that produce the reward; a checkpoint must provide all their parameters.
SCORING_MODULES = ("blip.visual_encoder.", "blip.text_encoder.", "mlp.")


def _blip_tokenizer(source: str):
    """BLIP's tokenizer: BERT's WordPiece vocabulary plus the [DEC] and [ENC] tokens, as the
    package's `init_tokenizer` builds it, but from `source` (a hub id or a local folder)."""
    from transformers import BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(source)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    # (the package reads additional_special_tokens_ids[0], an attribute transformers 5 removed)
    tokenizer.enc_token_id = tokenizer.convert_tokens_to_ids("[ENC]")
    return tokenizer


@contextlib.contextmanager
def _blip_construction(tokenizer_source: str, vision_encoder: dict | None) -> Iterator[None]:
    """While ImageReward builds its BLIP: take the tokenizer from `tokenizer_source`, and when
    `vision_encoder` is given build the image encoder as VisionTransformer(**vision_encoder)
    instead of the hard-coded ViT-L/16 (smaller encoders are for offline tests)."""
    from ImageReward.models.BLIP import blip_pretrain
    from ImageReward.models.BLIP.vit import VisionTransformer

    original = {"init_tokenizer": blip_pretrain.init_tokenizer, "create_vit": blip_pretrain.create_vit}
    blip_pretrain.init_tokenizer = lambda: _blip_tokenizer(tokenizer_source)
    if vision_encoder is not None:
        def create_vit(vit, image_size, use_grad_checkpointing=False, ckpt_layer=0, drop_path_rate=0):
            encoder = VisionTransformer(img_size=image_size, **vision_encoder)
            return encoder, encoder.embed_dim
        blip_pretrain.create_vit = create_vit
    try:
        yield
    finally:
        for name, value in original.items():
            setattr(blip_pretrain, name, value)


def missing_scoring_parameters(model: torch.nn.Module, state_dict: dict) -> list[str]:
    """Parameters of the reward path that `state_dict` lacks (the package loads with strict=False,
    which would silently leave them random)."""
    return [name for name, _ in model.named_parameters() if name.startswith(SCORING_MODULES) and name not in state_dict]


class ImageRewardScorer(QualityScorer):
    """ImageReward with the `image-reward` package's model.

    `checkpoint`: a name of IMAGE_REWARD_CHECKPOINTS (fetched from `hub_repo`) or a local file.
    `med_config`: the BERT config file (None: med_config.json of `hub_repo`). `tokenizer`: hub id
    or folder of a BERT WordPiece tokenizer. `vision_encoder`: VisionTransformer arguments
    replacing the package's ViT-L/16 (None keeps it; the released checkpoint needs it).
    """

    name = "imagereward"

    def __init__(self, checkpoint: str = "ImageReward-v1.0", med_config: str | None = None,
                 tokenizer: str = "bert-base-uncased", hub_repo: str = "THUDM/ImageReward",
                 vision_encoder: dict | None = None, device: str | None = None, dtype: str = "auto",
                 batch_size: int = 8):
        super().__init__(batch_size)
        import_image_reward()
        from ImageReward.ImageReward import ImageReward

        self.device = resolve_device(device)
        # "auto" is float32 here even on a GPU: the package's reward head is meant to run in
        # float32 (its score() casts to float first), and half precision visibly rounds rewards.
        self.dtype = torch.float32 if dtype == "auto" else resolve_dtype(dtype, self.device)
        if checkpoint in IMAGE_REWARD_CHECKPOINTS:
            checkpoint_path = local_or_hub_file(None, hub_repo, IMAGE_REWARD_CHECKPOINTS[checkpoint])
            checkpoint_label = f"{checkpoint}, {hub_repo}/{IMAGE_REWARD_CHECKPOINTS[checkpoint]}"
        else:
            checkpoint_path = existing_file(checkpoint)
            checkpoint_label = Path(checkpoint_path).name
        med_config_path = local_or_hub_file(med_config, hub_repo, "med_config.json")
        with _blip_construction(tokenizer, vision_encoder):
            # The package's model reads the device from this argument for the attention masks it makes.
            self.model = ImageReward(med_config=med_config_path, device=self.device)
        state_dict = load_torch_checkpoint(checkpoint_path)
        missing = missing_scoring_parameters(self.model, state_dict)
        if missing:
            raise ValueError(f"{checkpoint_path}: not an ImageReward checkpoint for this model, "
                             f"{len(missing)} parameter(s) missing, e.g. {missing[0]}")
        self.model.load_state_dict(state_dict, strict=False)
        self.model.to(self.device, self.dtype).eval()
        self.description = f"ImageReward reward, normalised as the image-reward package does ({checkpoint_label})"

    @torch.no_grad()
    def score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        blip = self.model.blip
        tokens = blip.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=PROMPT_TOKENS,
                                return_tensors="pt").to(self.device)
        pixels = torch.stack([self.model.preprocess(image) for image in images]).to(self.device, self.dtype)
        rewards = self.model.score_gard(tokens.input_ids, tokens.attention_mask, pixels)
        return rewards.float().reshape(-1).cpu()
