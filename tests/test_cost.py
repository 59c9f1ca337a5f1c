"""The cost model: FLOPs counted on the meta device, the recipe's counts read from the repository, GPU-hours."""

import pytest
import torch

from popalign import cost


def test_hand_computed_formulas():
    assert cost.image_flops(unet_forward=2.0, vae_decode=5.0, steps=10, guidance=True) == 10 * 2 * 2.0 + 5.0
    assert cost.image_flops(unet_forward=2.0, vae_decode=5.0, steps=10, guidance=False) == 25.0
    # 4 pairs: 8 samples x (3 policy forwards-equivalent + 1 reference forward); SFT: 4 winners x 3, no reference
    assert cost.training_step_flops(1.0, pairs=4, objective="popalign") == 32.0
    assert cost.training_step_flops(1.0, pairs=4, objective="sft") == 12.0
    assert cost.gpu_hours(989e12 * 0.5 * 3600, "H100", utilisation=0.5) == pytest.approx(1.0)


def test_the_flop_counter_on_the_meta_device_matches_a_hand_count():
    with torch.device("meta"):
        layer = torch.nn.Linear(64, 32)
        convolution = torch.nn.Conv2d(3, 8, kernel_size=3, padding=1)
    assert cost.count_flops(lambda: layer(torch.zeros(10, 64, device="meta"))) == 2 * 10 * 64 * 32
    assert cost.count_flops(lambda: convolution(torch.zeros(1, 3, 16, 16, device="meta"))) == 2 * 16 * 16 * 8 * 3 * 9


def test_the_real_architectures_have_their_published_sizes():
    sdxl = cost.component_flops("sdxl")
    assert sdxl["unet_parameters"] == 2_567_463_684  # SDXL base U-Net
    assert 6.7e12 < sdxl["unet_forward"] < 6.8e12
    assert cost.component_flops("sd15")["unet_parameters"] == 859_520_964  # SD 1.5 U-Net


def test_the_recipe_is_read_from_the_repository():
    recipe = cost.Recipe.from_repository(processes=8)
    assert (recipe.training_neutral_prompts, recipe.identities, recipe.images_per_neutral_prompt,
            recipe.images_per_identity_prompt) == (123, 12, 100, 10)
    assert recipe.training_images == 123 * 100 + 123 * 12 * 10
    assert (recipe.steps, recipe.guidance, recipe.train_steps, recipe.pairs_per_step) == (50, True, 750, 8)
    # eval.sh restricts race to white, asian, black (as the original): 2 x 3 identity-specific prompts per occupation
    assert recipe.eval_identities == 6
    assert recipe.evaluation_images == 2 * ((112 + 60) * 100 + 112 * 6 * 100) == 168_800


def test_training_step_with_prior_preservation_and_without_the_reference():
    # 1 pair: winner + loser (3 forwards each) + the winner under its own prompt (3) + reference passes
    assert cost.training_step_flops(1.0, pairs=1, objective="popalign", prior_preservation_target="noise") == 9 + 2
    assert cost.training_step_flops(1.0, pairs=1, objective="popalign", prior_preservation_target="reference") == 9 + 3
    assert cost.training_step_flops(1.0, pairs=1, objective="popalign", with_reference=False) == 6


def test_the_readers_have_their_published_costs():
    readers = cost.reader_flops()
    # ViT-L/14 at 224x224: about 81 G multiply-adds; VGG-16: 15.5 G multiply-adds (2 FLOP each)
    assert 1.55e11 < readers["classifier clip"] < 1.70e11
    assert 2 * 3.0e10 < readers["classifier deepface"] < 2 * 3.2e10
    assert readers["scorer hpsv2"] == readers["scorer pickscore"] > readers["scorer clip"] > readers["scorer aesthetic"]
    # every reader together is well under 1% of drawing an SDXL image
    sdxl = cost.component_flops("sdxl")
    drawn = cost.image_flops(sdxl["unet_forward"], sdxl["vae_decode"], 50, True)
    assert sum(readers.values()) < 0.01 * drawn
