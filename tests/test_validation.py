"""Population metrics during training (popalign.training.validation): the numbers against hand values and a slow
count, and a toy training that validates at step 0 and every N steps, resumes without duplicates, and logs to tensorboard."""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from popalign.attributes import load_attributes
from popalign.io import InputError
from popalign.training.checkpoints import prune_checkpoints
from popalign.training.validation import select_best_step, validation_metrics

REPO_ROOT = Path(__file__).resolve().parent.parent
TOY_ATTRIBUTES = REPO_ROOT / "data" / "toy" / "attributes.json"


def image_rows(prompt_id, kind, predicted, prompted=("", ""), faces=None, quality=1.0):
    faces = faces if faces is not None else [True] * len(predicted)
    return [{"prompt_id": prompt_id, "kind": kind, "gender": prompted[0], "race": prompted[1], "face_detected": face,
             "predicted_gender": gender if face else None, "predicted_race": race if face else None, "quality": quality}
            for (gender, race), face in zip(predicted, faces)]


def test_validation_metrics_equal_hand_values():
    attributes = load_attributes(TOY_ATTRIBUTES)
    genders, races = attributes["gender"].labels, attributes["race"].labels
    rows = (image_rows("a", "neutral", [(genders[0], races[0])] * 3 + [(genders[1], races[0])], quality=0.5)
            + image_rows("b", "neutral", [(genders[0], races[1]), (genders[1], races[2])], faces=[True, True], quality=1.0)
            + image_rows("b", "neutral", [(None, None)], faces=[False], quality=1.0)
            + image_rows("c", "identity", [(genders[0], races[0]), (genders[1], races[0])], prompted=(genders[0], races[0])))
    result = validation_metrics(pd.DataFrame(rows), attributes, ["gender", "race"])
    # prompt a: gender shares (3/4, 1/4) -> sqrt(2 * 0.25^2) = 0.35355; prompt b: (1/2, 1/2) -> 0
    assert result["discrepancy_gender"] == pytest.approx((math.sqrt(2 * 0.25 ** 2) + 0.0) / 2)
    # race, K = 3: a (1, 0, 0) -> sqrt((2/3)^2 + 2 (1/3)^2); b (0, 1/2, 1/2) -> sqrt((1/3)^2 + 2 (1/6)^2)
    race_a, race_b = math.sqrt((2 / 3) ** 2 + 2 * (1 / 3) ** 2), math.sqrt((1 / 3) ** 2 + 2 * (1 / 6) ** 2)
    assert result["discrepancy_race"] == pytest.approx((race_a + race_b) / 2)
    assert result["discrepancy_gender_low"] <= result["discrepancy_gender"] <= result["discrepancy_gender_high"]
    # Two prompts: the interval over prompts is wide, and cut to the discrepancy's range [0, sqrt(1/2)] / [0, sqrt(2/3)].
    assert result["discrepancy_gender_low"] == 0.0 and result["discrepancy_gender_high"] == pytest.approx(math.sqrt(0.5))
    assert 0.0 <= result["discrepancy_race_low"] and result["discrepancy_race_high"] <= math.sqrt(2 / 3) + 1e-12
    assert result["identity_accuracy"] == 0.5 and result["face_rate"] == pytest.approx(8 / 9)
    assert result["quality"] == pytest.approx((4 * 0.5 + 3 * 1.0) / 7) and result["neutral_prompts"] == 2


def test_the_discrepancy_floor_matches_a_slow_simulation():
    """The floor is what fair populations of the validation's sizes read: checked by drawing them."""
    attributes = load_attributes(TOY_ATTRIBUTES)
    genders = attributes["gender"].labels
    rng = np.random.default_rng(0)
    rows = []
    for prompt in range(4):
        rows += image_rows(f"p{prompt}", "neutral", [(genders[int(rng.integers(2))], attributes["race"].labels[0]) for _ in range(12)])
    result = validation_metrics(pd.DataFrame(rows), attributes, ["gender"])
    draws = rng.integers(0, 2, size=(20000, 12)).mean(axis=1)
    simulated = float(np.mean(np.sqrt(2) * np.abs(draws - 0.5)))
    assert result["discrepancy_gender_floor"] == pytest.approx(simulated, abs=0.003)


def test_the_best_step_is_the_lowest_discrepancy_within_the_accuracy_and_quality_margins():
    records = [{"step": 0, "discrepancy_gender": 0.6, "discrepancy_race": 0.8, "identity_accuracy": 0.95, "quality": 0.9},
               {"step": 10, "discrepancy_gender": 0.2, "discrepancy_race": 0.2, "identity_accuracy": 0.90, "quality": 0.9},  # accuracy out
               {"step": 20, "discrepancy_gender": 0.3, "discrepancy_race": 0.3, "identity_accuracy": 0.94, "quality": 0.84},  # quality out
               {"step": 30, "discrepancy_gender": 0.375, "discrepancy_race": 0.375, "identity_accuracy": 0.94, "quality": 0.86},
               {"step": 40, "discrepancy_gender": 0.5, "discrepancy_race": 0.25, "identity_accuracy": 0.99, "quality": 0.95},
               {"step": 50, "discrepancy_gender": 0.1, "discrepancy_race": 0.1, "identity_accuracy": 0.99, "quality": 0.95}]  # no weights
    candidates = {10, 20, 30, 40}
    assert select_best_step(records, candidates, accuracy_margin=0.02, quality_margin=0.05) == 30  # 0.375 ties 40's mean: the earlier
    assert select_best_step(records, candidates, accuracy_margin=0.10, quality_margin=0.05) == 10
    assert select_best_step(records, candidates, accuracy_margin=0.10, quality_margin=0.10) == 10
    assert select_best_step(records, {20}, accuracy_margin=0.02, quality_margin=0.05) is None
    assert select_best_step(records[1:], candidates, accuracy_margin=1.0, quality_margin=1.0) is None  # no step-0 reference
    # a NaN quality (no scorer) leaves that criterion out
    no_quality = [dict(record, quality=None) for record in records]  # validation.jsonl holds null
    assert select_best_step(no_quality, candidates, accuracy_margin=0.02, quality_margin=0.05) == 20


def test_pruning_keeps_the_exempt_best_checkpoint(tmp_path):
    from popalign.training.checkpoints import TRAINER_STATE

    for step in (1, 2, 3, 4):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / TRAINER_STATE).write_text(json.dumps({"global_step": step}))
    deleted = prune_checkpoints(tmp_path, keep=1, exempt_steps=frozenset({2}))
    assert sorted(path.name for path in deleted) == ["checkpoint-1", "checkpoint-3"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-4"]


@pytest.fixture
def toy_training_inputs(tmp_path):
    """Pairs of rendered toy figures captioned with the doctor's neutral prompt; validation prompts of the chef."""
    import subprocess
    import sys

    from popalign.toy.world import load_world, render_figure

    world = load_world()
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    rows = []
    for index in range(4):
        winner = render_figure(world, "doctor", world.genders[index % 2], world.races[index % 3], rng)
        loser = render_figure(world, "doctor", world.genders[0], world.races[0], rng)
        winner.save(tmp_path / "images" / f"w{index}.png")
        loser.save(tmp_path / "images" / f"l{index}.png")
        rows.append((f"images/w{index}.png", f"images/l{index}.png", "a photo of a doctor in a clinic"))
    with open(tmp_path / "pairs.csv", "w", newline="", encoding="utf-8") as stream:
        csv.writer(stream).writerows([("winner_path", "loser_path", "caption"), *rows])
    (tmp_path / "chef.csv").write_text("occupation,activity\nchef,in a kitchen\n", encoding="utf-8")
    subprocess.run([sys.executable, str(REPO_ROOT / "1_generate_diverse_prompts.py"), "--input", str(tmp_path / "chef.csv"),
                    "--attributes", str(TOY_ATTRIBUTES), "--output", str(tmp_path / "validation_prompts.csv")], check=True)
    return tmp_path


def toy_config(inputs: Path, **overrides):
    from popalign.training.config import TrainConfig

    values = dict(pairs_file=str(inputs / "pairs.csv"), output_dir=str(inputs / "run"), pretrained_model=str(REPO_ROOT / "models" / "toy_base"),
                  vae="", resolution=32, mixed_precision="no", report_to="none", learning_rate=1e-4, lr_warmup_steps=0,
                  max_train_steps=2, train_batch_size=2, checkpointing_steps=1, use_8bit_adam=False, gradient_checkpointing=False,
                  caption_dropout=0.0, resume_from_checkpoint="latest", beta=1.0,
                  validation_prompts_file=str(inputs / "validation_prompts.csv"), validation_steps=1, num_validation_images=6,
                  num_validation_identity_images=1, validation_classifier="toy", validation_attributes=str(TOY_ATTRIBUTES),
                  validation_scorer="toy", validation_num_inference_steps=8, validation_guidance_scale=1.0)
    values.update(overrides)
    return TrainConfig(**values)


def reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_a_toy_training_validates_at_step_0_and_every_n_steps_and_resumes_without_duplicates(toy_training_inputs):
    from PIL import Image

    from popalign.training.trainer import train

    reset_accelerate()
    stopped = train(toy_config(toy_training_inputs, stop_after_steps=1, report_to="tensorboard"))
    reset_accelerate()
    assert not stopped.finished
    run = toy_training_inputs / "run"
    # a kill after the step-1 checkpoint but with a line of a later step written: the resume drops it
    with open(run / "validation.jsonl", "a", encoding="utf-8") as stream:
        stream.write(json.dumps({"step": 2, "discrepancy_gender": 9.0}) + "\n")
    finished = train(toy_config(toy_training_inputs, report_to="tensorboard"))
    reset_accelerate()
    assert finished.finished
    records = [json.loads(line) for line in (run / "validation.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records] == [0, 1, 2]
    for record in records:
        assert record["images"] == 6 + 6 * 1 and record["neutral_prompts"] == 1 and record["identity_prompts"] == 6
        assert 0.0 <= record["discrepancy_gender"] <= math.sqrt(0.5) + 1e-9 and record["discrepancy_gender_floor"] > 0
        assert 0.0 <= record["identity_accuracy"] <= 1.0 and 0.0 <= record["quality"] <= 1.0
        assert record["discrepancy_gender_low"] is None  # one neutral prompt: no interval, recorded as null
    # the step-0 validation draws the base model's populations: its numbers do not depend on the training that follows
    assert records[0]["discrepancy_race"] != 9.0
    grids = sorted(path.name for path in (run / "validation").iterdir())
    assert grids == ["step_000000.png", "step_000001.png", "step_000002.png"]
    assert Image.open(run / "validation" / "step_000000.png").size == (4 * 32, 1 * 32)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logged = {}
    for events in (run / "logs").rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            logged.setdefault(tag, set()).update(event.step for event in accumulator.Scalars(tag))
    assert logged["validation/discrepancy_gender"] == {0, 1, 2} and "validation/identity_accuracy" in logged
    # The best checkpoint: named in finished.json by the declared rule, loadable in stock diffusers, and eval.sh's kind best.
    import subprocess
    import sys

    from diffusers import UNet2DConditionModel

    finished_record = json.loads((run / "finished.json").read_text())
    expected = select_best_step(records, {1, 2}, 0.02, 0.05)
    assert finished_record["best"]["step"] == expected
    printed = subprocess.run([sys.executable, "-m", "popalign.training.checkpoints", "best", str(run)], capture_output=True, text=True)
    if expected is None:
        assert printed.returncode == 2 and "names no best checkpoint" in printed.stderr
    else:
        kind, path = printed.stdout.split()
        assert kind == "unet" and Path(path) == (run / "unet" if expected == 2 else run / "checkpoint-1" / "unet")
        UNet2DConditionModel.from_pretrained(path)


def test_validation_prompts_that_were_trained_on_are_refused_before_anything_is_written(toy_training_inputs):
    from popalign.training.trainer import train

    training_prompts = toy_training_inputs / "doctor.csv"
    training_prompts.write_text("occupation,activity\ndoctor,in a clinic\n", encoding="utf-8")
    import subprocess
    import sys

    subprocess.run([sys.executable, str(REPO_ROOT / "1_generate_diverse_prompts.py"), "--input", str(training_prompts),
                    "--attributes", str(TOY_ATTRIBUTES), "--output", str(toy_training_inputs / "trained.csv")], check=True)
    reset_accelerate()
    with pytest.raises(InputError, match="is a caption of the pairs file"):
        train(toy_config(toy_training_inputs, validation_prompts_file=str(toy_training_inputs / "trained.csv")))
    with pytest.raises(InputError, match="--validation_classifier must be one of"):
        train(toy_config(toy_training_inputs, validation_classifier="oracle"))
    reset_accelerate()
    assert not (toy_training_inputs / "run").exists()


def test_a_validation_draws_with_the_text_encoder_it_is_given(toy_training_inputs):
    """With --train_text_encoder the validation draws with the encoders being trained: other pictures than the base's,
    and the pipeline keeps its own encoder afterwards."""
    import copy

    import torch
    from PIL import Image

    from popalign.distributed import make_accelerator
    from popalign.training.models import load_unet
    from popalign.training.validation import TrainingValidation

    reset_accelerate()
    config = toy_config(toy_training_inputs, num_validation_images=4, num_validation_identity_images=0)
    (toy_training_inputs / "run").mkdir()
    validation = TrainingValidation(config, make_accelerator())
    unet = load_unet(config.pretrained_model)
    first = validation.run(unet, 0)
    pipeline = validation._components(unet, ())[0]
    base_encoder = pipeline.text_encoder
    changed = copy.deepcopy(base_encoder)
    with torch.no_grad():
        for parameter in changed.parameters():
            parameter.add_(0.5 * torch.randn_like(parameter))
    second = validation.run(unet, 1, [changed])
    reset_accelerate()
    assert pipeline.text_encoder is base_encoder and first["images"] == second["images"] == 4
    grids = [Image.open(toy_training_inputs / "run" / "validation" / f"step_00000{step}.png").tobytes() for step in (0, 1)]
    assert grids[0] != grids[1]


@pytest.mark.slow
def test_two_processes_validate_the_populations_of_one(toy_training_inputs):
    """The validation images are sharded over the processes (each draws every second image) and gathered: two
    processes measure what one does, to float rounding of the two trainings."""
    import os
    import subprocess
    import sys

    from popalign.training.trainer import train

    reset_accelerate()
    train(toy_config(toy_training_inputs, output_dir=str(toy_training_inputs / "one"), max_train_steps=1, checkpointing_steps=0,
                     train_batch_size=2, learning_rate=1e-9))
    reset_accelerate()
    config = toy_config(toy_training_inputs, output_dir=str(toy_training_inputs / "two"), max_train_steps=1, checkpointing_steps=0,
                        train_batch_size=1, learning_rate=1e-9)
    argv = [f"--{name}={('on' if value else 'off') if isinstance(value, bool) else value}" for name, value in config.to_dict().items()]
    completed = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
                                str(REPO_ROOT / "train_popalign.py"), *argv], cwd=REPO_ROOT,
                               env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    one = [json.loads(line) for line in (toy_training_inputs / "one" / "validation.jsonl").read_text().splitlines()]
    two = [json.loads(line) for line in (toy_training_inputs / "two" / "validation.jsonl").read_text().splitlines()]
    assert [record["step"] for record in two] == [0, 1] and len(two) == len(one)
    for first, second in zip(one, two):
        assert second["images"] == first["images"] == 12
        for name in ("discrepancy_gender", "discrepancy_race", "identity_accuracy", "face_rate"):
            assert second[name] == pytest.approx(first[name], abs=1e-9), name
        assert second["quality"] == pytest.approx(first["quality"], abs=1e-3)
    one_grid = (toy_training_inputs / "one" / "validation" / "step_000000.png").read_bytes()
    assert one_grid == (toy_training_inputs / "two" / "validation" / "step_000000.png").read_bytes()


def test_a_negative_base_quality_keeps_the_margin_a_share_of_its_size():
    """ImageReward scores can be negative: the quality floor is step 0's minus margin x |step 0's|, never above it."""
    records = [{"step": 0, "discrepancy_gender": 0.6, "identity_accuracy": 0.9, "quality": -0.5},
               {"step": 1, "discrepancy_gender": 0.3, "identity_accuracy": 0.9, "quality": -0.5},   # equal to the base: eligible
               {"step": 2, "discrepancy_gender": 0.2, "identity_accuracy": 0.9, "quality": -0.53}]  # below -0.525: not
    assert select_best_step(records, {1, 2}, accuracy_margin=0.02, quality_margin=0.05) == 1


def test_validations_of_other_settings_and_later_steps_are_dropped(tmp_path):
    from popalign.training.validation import read_validations, trim_validations

    lines = [{"step": 0, "settings": "old"}, {"step": 0, "settings": "new"}, {"step": 5, "settings": "new"}, {"step": 9, "settings": "new"}]
    (tmp_path / "validation.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"step": 1', encoding="utf-8")
    trim_validations(tmp_path, 5, "new")
    assert [(record["step"], record["settings"]) for record in read_validations(tmp_path)] == [(0, "new"), (5, "new")]


def test_the_last_step_is_always_validated(toy_training_inputs):
    from popalign.training.validation import TrainingValidation

    class OneProcess:
        process_index, num_processes, is_main_process = 0, 1, True

    validation = TrainingValidation(toy_config(toy_training_inputs, validation_steps=4, max_train_steps=6), OneProcess())
    assert [step for step in range(8) if validation.due(step)] == [0, 4, 6]
