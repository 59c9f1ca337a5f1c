"""The objectives table: every --loss is one entry, and a new entry trains without touching any other module."""

import ast
from pathlib import Path

import pytest
import torch

from popalign import cost
from popalign.io import InputError
from popalign.losses import diffusion_dpo_loss, popalign_loss
from popalign.training import objectives
from popalign.training.config import TrainConfig, build_parser
from popalign.training.objectives import OBJECTIVES, Objective, objective_named, register_objective, winners_only

PACKAGE = Path(__file__).resolve().parent.parent / "popalign"


def test_the_table_holds_the_shipped_objectives_with_what_each_reads():
    assert list(OBJECTIVES) == ["popalign", "dpo", "sft", "sudo"]
    assert [(entry.uses_reference, entry.reads_losers, entry.samples_per_pair) for entry in OBJECTIVES.values()] == [
        (True, True, 2), (True, True, 2), (False, False, 1), (True, False, 2)]
    with pytest.raises(InputError, match="--loss must be one of popalign, dpo, sft, sudo"):
        objective_named("ipo")


def test_an_entry_passes_its_loss_only_its_config_fields():
    config = TrainConfig(pairs_file="p.csv", output_dir="o", beta=3.0, popalign_alpha=0.25, lambda_loser=0.5)
    policy, reference = torch.tensor([0.2, 0.5, 0.4, 0.1]), torch.tensor([0.3, 0.3, 0.3, 0.3])
    loss, _ = OBJECTIVES["popalign"].compute(policy, reference, config, None)
    expected, _ = popalign_loss(policy[:2], policy[2:], reference[:2], reference[2:], beta=3.0, alpha=0.25, lambda_l=0.5)
    assert torch.equal(loss, expected)
    loss, _ = OBJECTIVES["dpo"].compute(policy, reference, config, None)
    assert torch.equal(loss, diffusion_dpo_loss(policy[:2], policy[2:], reference[:2], reference[2:], beta=3.0)[0])


def test_the_checks_of_an_entry_run_in_the_config_validation():
    with pytest.raises(InputError, match="--train_batch_size must be >= 2"):
        TrainConfig(pairs_file="p.csv", output_dir="o", loss="sudo").validate()
    with pytest.raises(InputError, match="--beta must be > 0 for --loss dpo"):
        TrainConfig(pairs_file="p.csv", output_dir="o", loss="dpo", beta=0.0).validate()
    TrainConfig(pairs_file="p.csv", output_dir="o", loss="sft", beta=0.0).validate()  # SFT reads no beta


def test_no_module_outside_the_table_compares_objective_names():
    """Outside objectives.py, no comparison in the package has an objective's name as an operand."""
    names = set(OBJECTIVES)
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "objectives.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Compare):
                operands = [node.left, *node.comparators]
                constants = {operand.value for operand in operands if isinstance(operand, ast.Constant)}
                for operand in operands:
                    if isinstance(operand, (ast.Tuple, ast.List, ast.Set)):
                        constants |= {item.value for item in operand.elts if isinstance(item, ast.Constant)}
                if constants & names:
                    offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert offenders == []


def test_the_cost_model_counts_a_step_from_the_table():
    assert cost.training_step_flops(1.0, pairs=4, objective="sudo") == 4 * 2 * 3 + 4 * 2
    labels = [label for label, _, _ in cost.training_step_rows()]
    assert labels[:2] == ["popalign, dpo, sudo", "sft (no reference)"]


@pytest.fixture
def throwaway_objective():
    """A winners-only objective with a reference: mean over winners of (m - r)^2 * weight; removed after the test."""
    def loss(policy_errors, reference_errors, reduce_mean, learning_rate):
        value = (policy_errors - reference_errors).square().mean() * 1e3 + policy_errors.mean()
        return value, {"loss": value.detach(), "learning_rate_seen": torch.tensor(learning_rate)}

    entry = register_objective(Objective("throwaway", "a throwaway objective for a test", loss, winners_only, uses_reference=True,
                                         reads_losers=False, config_fields=("learning_rate",)))
    yield entry
    del objectives.OBJECTIVES["throwaway"]


def test_a_registered_objective_is_a_loss_choice_and_trains_two_toy_steps(throwaway_objective, tiny_sdxl_path, tmp_path):
    import csv
    import json

    from accelerate.state import AcceleratorState, GradientState
    from PIL import Image

    from popalign.training.trainer import train

    assert "throwaway" in build_parser().parse_args(["--pairs_file", "p", "--output_dir", "o", "--loss", "throwaway"]).loss
    (tmp_path / "images").mkdir()
    for index, colour in enumerate([(200, 30, 30), (30, 200, 30)]):
        Image.new("RGB", (32, 32), colour).save(tmp_path / "images" / f"{index}.png")
    with open(tmp_path / "winners.csv", "w", newline="", encoding="utf-8") as stream:
        csv.writer(stream).writerows([("winner_path", "caption"), ("images/0.png", "a photo of a doctor"), ("images/1.png", "a photo of a nurse")])
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    config = TrainConfig(pairs_file=str(tmp_path / "winners.csv"), output_dir=str(tmp_path / "run"), loss="throwaway",
                         pretrained_model=str(tiny_sdxl_path), resolution=32, mixed_precision="no", report_to="none", learning_rate=1e-3,
                         lr_warmup_steps=0, max_train_steps=2, train_batch_size=2, checkpointing_steps=0, vae="", use_8bit_adam=False,
                         resume_from_checkpoint="", caption_dropout=0.0)
    result = train(config)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    assert result.finished and result.global_step == 2
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logged] == [1, 2]
    assert all(abs(row["learning_rate_seen"] - 1e-3) < 1e-9 for row in logged)
    # Step 1: policy == reference, so the loss is the mean winner error alone; step 2 has moved away from it.
    assert logged[0]["loss"] > 0 and logged[1]["loss"] != logged[0]["loss"]
    assert "a throwaway objective for a test" in (tmp_path / "run" / "README.md").read_text()
    assert cost.training_step_flops(1.0, pairs=2, objective="throwaway") == 2 * 3 + 2
