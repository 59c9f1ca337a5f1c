"""The cost model: FLOPs counted on the meta device, the recipe's counts read from the repository, GPU-hours."""

import math

import numpy as np
import pytest
import torch

from popalign import cost


def test_hand_computed_formulas():
    assert cost.image_flops(unet_forward=2.0, vae_decode=5.0, steps=10, guidance=True) == 10 * 2 * 2.0 + 5.0
    assert cost.image_flops(unet_forward=2.0, vae_decode=5.0, steps=10, guidance=False) == 25.0
    # 4 pairs: 8 samples x (3 policy forwards-equivalent + 1 reference forward); SFT: 4 winners x 3, no reference
    assert cost.training_step_flops(1.0, pairs=4, objective="popalign") == 32.0
    assert cost.training_step_flops(1.0, pairs=4, objective="sft") == 12.0
    # gradient checkpointing runs the policy's forward again in the backward pass: 4 forwards per trained sample
    assert cost.training_step_flops(1.0, pairs=4, objective="popalign", gradient_checkpointing=True) == 8 * 4 + 8
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


def test_the_recipe_reads_the_first_round_of_target_interval_width():
    assert cost.Recipe.from_repository().eval_min_images_per_identity_prompt == 10  # eval.sh's MIN_IMAGES_PER_IDENTITY_PROMPT


def test_expected_images_of_the_rule_hand_values():
    from popalign.evaluate.precision import wilson_interval

    # Every reading right (or every one wrong): 10 of 10 gives a Wilson width of z^2 / (10 + z^2) = 0.278 > 0.2, and
    # 20 of 20 gives 0.161 <= 0.2: 20 images, for one model or two. At 0.1 it takes 40 (width 0.088).
    for accuracy in (1.0, 0.0):
        assert cost.expected_images_per_prompt([accuracy], 0.2, start=10, cap=100) == pytest.approx(20.0)
        assert cost.expected_images_per_prompt([accuracy, accuracy], 0.2, start=10, cap=100) == pytest.approx(20.0)
    assert cost.expected_images_per_prompt([1.0], 0.1, start=10, cap=100) == pytest.approx(40.0)
    # One round before the cap: 10 images when the first 10 are narrow enough, else 20.
    p = 0.9
    stop = sum(math.comb(10, k) * p ** k * (1 - p) ** (10 - k) for k in range(11)
               if wilson_interval(k, 10)[1] - wilson_interval(k, 10)[0] <= 0.3)
    assert 0 < stop < 1
    assert cost.expected_images_per_prompt([p], 0.3, start=10, cap=20) == pytest.approx(10 * stop + 20 * (1 - stop))
    # Two models: the prompt goes on while either needs more, so it stops at 10 only when both do (independently).
    assert cost.expected_images_per_prompt([p, p], 0.3, start=10, cap=20) == pytest.approx(10 * stop ** 2 + 20 * (1 - stop ** 2))
    with pytest.raises(ValueError):
        cost.expected_images_per_prompt([1.2], 0.2, start=10, cap=100)


@pytest.mark.parametrize("accuracies", [(0.9, 0.9), (0.95, 0.8), (0.7,)])
def test_expected_images_of_the_rule_equal_a_simulation(accuracies):
    """A slow, independent replay: every model's readings drawn image by image, rounds from 10 doubling to 100, the
    prompt stopping when every model's Wilson interval is 0.2 wide or narrower."""
    from popalign.evaluate.precision import wilson_interval

    rng = np.random.default_rng(0)
    prompts = 20_000
    right = [np.cumsum(rng.random((prompts, 100)) < accuracy, axis=1) for accuracy in accuracies]  # right among the first n
    narrow = {n: np.array([wilson_interval(k, n)[1] - wilson_interval(k, n)[0] <= 0.2 for k in range(n + 1)])
              for n in (10, 20, 40, 80)}
    drawn = np.full(prompts, 100)
    open_prompts = np.ones(prompts, dtype=bool)
    for n in (10, 20, 40, 80):
        done = open_prompts & np.all([narrow[n][counts[:, n - 1]] for counts in right], axis=0)
        drawn[done] = n
        open_prompts &= ~done
    simulated, standard_error = drawn.mean(), drawn.std() / np.sqrt(prompts)
    assert cost.expected_images_per_prompt(list(accuracies), 0.2, start=10, cap=100) == pytest.approx(simulated, abs=4 * standard_error)


def test_the_run_share_of_target_interval_width():
    recipe = cost.Recipe.from_repository(processes=8)
    assert cost.run_share_with_target_width("sdxl", recipe, recipe.eval_images_per_identity_prompt) == pytest.approx(1.0)
    # The identity-specific images are generated, classified and scored like every other evaluation image: the share is
    # the images' count with the training images weighted by their own (cheaper: no scorers, but VAE encoding) cost.
    share = cost.run_share_with_target_width("sdxl", recipe, 20)
    identity_images = recipe.eval_models * recipe.eval_neutral_prompts * recipe.eval_identities * 100
    by_images = (recipe.training_images + recipe.evaluation_images - identity_images * 0.8) / (recipe.training_images + recipe.evaluation_images)
    assert share == pytest.approx(by_images, abs=0.005)
    lines = cost.target_width_table("sdxl", recipe, widths=(0.2,), accuracies=(1.0, 0.5))
    assert lines[-2:] == [f"| 100% | 20, {share:.0%} |", "| 50% | 100, 100% |"]
