"""Tiny random-weight stand-ins for the five scorers' checkpoints, built offline.

Each has the architecture family of the real checkpoint and is saved where and how the real one
is read (an open_clip config + HPS-style checkpoint, transformers CLIP folders, the aesthetic
MLP's state dict with the published key names, an ImageReward checkpoint with its BERT config
and WordPiece vocabulary), so the scorers run their real loading and scoring code on them.
`build_tiny_scorer_assets(root)` returns the build_scorer options of each scorer:

    options = build_tiny_scorer_assets("/tmp/tiny-scorers")
    build_scorer("hpsv2", **options["hpsv2"]).score(images, prompts)

    python -m popalign.score.tiny --out /tmp/tiny-scorers   # writes scorer_options.json too
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from popalign.tiny_models import build_tiny_clip_model

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# ImageReward's reward head is MLP(768) on the BERT [CLS] state, so the text encoder keeps
# BERT-base's width; everything else is shrunk.
IMAGE_REWARD_TEXT_WIDTH = 768
TINY_WORDPIECE_WORDS = (
    "a an the of in on at with and photo picture portrait realistic person man woman doctor nurse teacher engineer "
    "chef pilot farmer artist working reading hospital office kitchen street red blue green cat dog house tree sky"
).split()


def build_tiny_open_clip_hps(path: str | Path, seed: int = 0) -> dict:
    """An open_clip ViT (config in `path`/open_clip_config.json) and its random weights saved as an
    HPS checkpoint ({'state_dict': ...}). Returns HPSv2Scorer options."""
    import open_clip

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "model_cfg": {
            "embed_dim": 16,
            "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
            # CLIP's full BPE vocabulary, so open_clip's own tokenizer can be used unchanged.
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
        },
        "preprocess_cfg": {"mean": OPENAI_CLIP_MEAN, "std": OPENAI_CLIP_STD},
    }
    (path / "open_clip_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    model_name = f"local-dir:{path.resolve()}"
    torch.manual_seed(seed)
    model = open_clip.create_model(model_name, load_weights=False)
    checkpoint = path / "HPS_tiny.pt"
    torch.save({"state_dict": model.state_dict()}, checkpoint)
    return {"version": "v2.1", "checkpoint": str(checkpoint), "model_name": model_name}


def build_tiny_aesthetic_weights(path: str | Path, embedding_dim: int, seed: int = 0) -> Path:
    """A random AestheticMLP state dict (the published key names) for `embedding_dim`-d embeddings."""
    from popalign.score.aesthetic import AestheticMLP

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    torch.save(AestheticMLP(embedding_dim).state_dict(), path)
    return path


def build_tiny_image_reward(path: str | Path, seed: int = 0) -> dict:
    """An ImageReward checkpoint of the package's model class with a one-layer BERT, a small ViT,
    a WordPiece vocabulary and med_config.json, all in `path`. Returns ImageRewardScorer options."""
    from transformers import BertTokenizer

    from popalign.score.compat import import_image_reward
    from popalign.score.image_reward import _blip_construction

    import_image_reward()
    from ImageReward.ImageReward import ImageReward

    path = Path(path)
    tokenizer_dir = path / "tokenizer"
    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    letters = [chr(code) for code in range(ord("a"), ord("z") + 1)]
    vocabulary = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", *letters, *(f"##{letter}" for letter in letters),
                  *TINY_WORDPIECE_WORDS]
    (tokenizer_dir / "vocab.txt").write_text("\n".join(vocabulary) + "\n", encoding="utf-8")
    BertTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tokenizer_dir)
    med_config = {
        "architectures": ["BertModel"], "model_type": "bert", "hidden_act": "gelu", "hidden_size": IMAGE_REWARD_TEXT_WIDTH,
        "num_hidden_layers": 1, "num_attention_heads": 12, "intermediate_size": 64, "max_position_embeddings": 64,
        # the [DEC] and [ENC] tokens BLIP adds to the vocabulary
        "vocab_size": len(vocabulary) + 2, "type_vocab_size": 2, "pad_token_id": 0, "layer_norm_eps": 1e-12,
        "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "initializer_range": 0.02,
        "add_cross_attention": True, "encoder_width": 32,
    }
    med_config_path = path / "med_config.json"
    med_config_path.write_text(json.dumps(med_config, indent=2), encoding="utf-8")
    vision_encoder = {"patch_size": 32, "embed_dim": 32, "depth": 1, "num_heads": 2}
    torch.manual_seed(seed)
    with _blip_construction(str(tokenizer_dir), vision_encoder):
        model = ImageReward(med_config=str(med_config_path), device="cpu")
    # The package initialises its head with std 1/769, which makes every tiny reward equal to
    # float precision; PyTorch's default Linear init keeps differences between images visible.
    for module in model.mlp.modules():
        if isinstance(module, torch.nn.Linear):
            module.reset_parameters()
    checkpoint = path / "ImageReward_tiny.pt"
    torch.save(model.state_dict(), checkpoint)
    return {"checkpoint": str(checkpoint), "med_config": str(med_config_path), "tokenizer": str(tokenizer_dir),
            "vision_encoder": vision_encoder}


def build_tiny_scorer_assets(root: str | Path, seed: int = 0) -> dict[str, dict]:
    """Build every tiny scorer under `root`; returns {scorer name: build_scorer options}."""
    root = Path(root)
    clip_path = str(build_tiny_clip_model(root / "clip", seed))
    aesthetic_weights = build_tiny_aesthetic_weights(root / "aesthetic" / "aesthetic_tiny.pth", embedding_dim=16, seed=seed)
    return {
        "hpsv2": build_tiny_open_clip_hps(root / "hpsv2", seed),
        "pickscore": {"model": clip_path, "processor": clip_path},
        "clip": {"model": clip_path},
        "aesthetic": {"clip_model": clip_path, "weights": str(aesthetic_weights)},
        "imagereward": build_tiny_image_reward(root / "imagereward", seed),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Build tiny random-weight checkpoints for the quality scorers, offline.")
    parser.add_argument("--out", required=True, help="folder to write them to")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    options = build_tiny_scorer_assets(args.out, args.seed)
    options_path = Path(args.out) / "scorer_options.json"
    options_path.write_text(json.dumps(options, indent=2), encoding="utf-8")
    print(options_path)


if __name__ == "__main__":
    main()
