"""The published architectures of the checkpoints the pipeline loads, as constructor arguments (no weights).

The cost model (popalign.cost) builds them on the meta device to count FLOPs; popalign.tiny_models shrinks them into
random-weight test models of the same layout.
"""

# The published configurations (diffusers config.json of each checkpoint's unet/ and vae/).
SDXL_UNET = dict(act_fn="silu", addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
                 attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280], cross_attention_dim=2048,
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], in_channels=4, layers_per_block=2,
                 mid_block_type="UNetMidBlock2DCrossAttn", norm_num_groups=32, out_channels=4, projection_class_embeddings_input_dim=2816,
                 sample_size=128, transformer_layers_per_block=[1, 2, 10],
                 up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], use_linear_projection=True)
SD15_UNET = dict(act_fn="silu", attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=768,
                 down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                 in_channels=4, layers_per_block=2, norm_num_groups=32, out_channels=4, sample_size=64,
                 up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"])
VAE = dict(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
           up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2, latent_channels=4, in_channels=3, out_channels=3)
MODELS = {"sdxl": {"unet": SDXL_UNET, "resolution": 1024, "text_tokens": 77, "text_dim": 2048, "pooled_dim": 1280},
          "sd15": {"unet": SD15_UNET, "resolution": 512, "text_tokens": 77, "text_dim": 768, "pooled_dim": 0}}

# The published architectures of the text encoders, quality scorers and classifiers (transformers configurations of
# the checkpoints eval.sh and step 2 load). width, layers, heads, MLP size.
CLIP_TEXT_L = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)      # CLIP ViT-L/14's
CLIP_TEXT_BIGG = dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=20, intermediate_size=5120)  # OpenCLIP bigG's
CLIP_TEXT_H = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)     # OpenCLIP ViT-H-14's
VISION_L14 = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, patch_size=14, image_size=224)
VISION_H14 = dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, intermediate_size=5120, patch_size=14, image_size=224)
VISION_L16 = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, patch_size=16, image_size=224)
TEXT_ENCODERS = {"sdxl": (CLIP_TEXT_L, CLIP_TEXT_BIGG), "sd15": (CLIP_TEXT_L,)}
IMAGE_REWARD_TOKENS = 35  # ImageReward's BLIP text encoder reads prompts padded to 35 tokens
