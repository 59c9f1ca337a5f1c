"""A toy world of one's own: an occupation file with its own splits and skews, a base built for it, a study run on it.
What a user-made configuration gets wrong is refused in one line naming the file and row (or folder), before work."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from popalign.io import InputError, file_sha256
from popalign.prompts import read_neutral_prompts
from popalign.toy.base import check_base_world
from popalign.toy.dataset import build_biased_dataset, neutral_skew
from popalign.toy.world import ToyWorld, load_world

REPO = Path(__file__).resolve().parent.parent


def load_script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_split_cells_are_read_without_their_spaces_and_every_row_is_named_by_its_line(tmp_path):
    source = tmp_path / "occupations.csv"
    source.write_text("occupation,activity,split\npilot,in a cockpit, train\nchef,in a kitchen,heldout \nbaker,,train\n", encoding="utf-8")
    assert list(read_neutral_prompts(source, "train")["occupation"]) == ["pilot", "baker"]
    assert list(read_neutral_prompts(source, " heldout")["occupation"]) == ["chef"]
    # a bad row outside the split asked for is still found, by its line in the file (not its place in the split)
    source.write_text("occupation,activity,split\npilot,in a cockpit,train\nchef,in a kitchen,heldout\n,in a bakery,heldout\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"occupations.csv: row 4: empty occupation"):
        read_neutral_prompts(source, "train")
    source.write_text("occupation,activity,split\npilot,in a cockpit,train\nchef,in a kitchen,\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"row 3: empty split"):
        read_neutral_prompts(source, "train")  # before: chef silently left out of training
    source.write_text("occupation,activity,split\npilot,in a cockpit,train\nchef,in a kitchen,held out\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"row 3: split 'held out': use letters, digits"):
        read_neutral_prompts(source)  # it would name a folder and be split into two words by the shell scripts
    source.write_text("occupation,activity,split\npilot,in a cockpit,train\npilot,in the air,heldout\n", encoding="utf-8")
    result = subprocess.run([sys.executable, "1_generate_diverse_prompts.py", "--input", str(source), "--split", "train",
                             "--output", str(tmp_path / "out.csv"), "--axes", "gender"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert "row 3: pilot is in two splits (train, heldout)" in result.stderr and not (tmp_path / "out.csv").exists()
    source.write_text("occupation,activity,split\npilot,in a cockpit,train\nPilot,in the air,heldout\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"row 3: Pilot is in two splits \(train, heldout\)"):
        read_neutral_prompts(source)  # names that differ only in case are one occupation


def test_a_file_saved_with_a_byte_order_mark_reads_like_one_without(tmp_path):
    source = tmp_path / "occupations.csv"
    source.write_bytes("occupation,activity\npilot,in a cockpit\n".encode("utf-8-sig"))
    assert list(read_neutral_prompts(source)["occupation"]) == ["pilot"]


def test_each_occupation_draws_the_majority_its_row_names_or_else_the_one_of_its_place(tmp_path):
    attributes = REPO / "data" / "toy" / "attributes.json"  # genders male, female; races white, asian, black
    default = load_world()
    # without majority columns: occupation i gets genders[i % 2] and races[i % 3]
    assert default.majority_genders[:4] == ("male", "female", "male", "female")
    assert default.majority_races[:4] == ("white", "asian", "black", "white")
    source = tmp_path / "occupations.csv"
    source.write_text("occupation,activity,majority_gender,majority_race\npilot,in a cockpit,female,black\n"
                      "chef,in a kitchen,female, white\nbaker,,male,asian\n", encoding="utf-8")
    world = load_world(source, attributes)
    assert (world.majority_genders, world.majority_races) == (("female", "female", "male"), ("black", "white", "asian"))
    genders, races = neutral_skew(world, "pilot", 0.85, 0.8)
    assert genders == pytest.approx({"male": 0.15, "female": 0.85})
    assert races == pytest.approx({"white": 0.1, "asian": 0.1, "black": 0.8})
    prompts = pd.DataFrame({"kind": ["neutral"], "prompt": ["a photo of a chef in a kitchen"], "occupation": ["chef"],
                            "gender": [""], "race": [""]})
    drawn = build_biased_dataset(world, prompts, tmp_path / "data", 6, 1, gender_majority=1.0, race_majority=1.0)
    assert set(drawn["gender"]) == {"female"} and set(drawn["race"]) == {"white"}
    source.write_text("occupation,activity,majority_gender,majority_race\npilot,in a cockpit,female,black\n"
                      "chef,in a kitchen,female,green\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"occupations.csv: row 3: majority_race 'green' is not one of white, asian, black"):
        load_world(source, attributes)
    source.write_text("occupation,activity\npilot,in a cockpit\nchef,in a kitchen\nPilot,in the air\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"row 4: Pilot again \(row 2\)"):
        load_world(source, attributes)
    with pytest.raises(ValueError, match="majority_races"):
        ToyWorld(("pilot",), ("",), ("male", "female"), ("white", "asian"), majority_races=("black",))


def test_a_base_is_refused_for_a_world_it_was_not_built_for(tmp_path, capsys):
    toy, toy36 = REPO / "data" / "toy" / "occupations.csv", REPO / "data" / "toy" / "occupations_36.csv"
    for model, occupations in (("toy_base", toy), ("toy_base_36", toy36), ("toy_base_36_v2", toy36)):
        check_base_world(REPO / "models" / model, load_world(occupations), occupations)  # each shipped base fits its file
    with pytest.raises(InputError, match=r"toy_base/toy_world.json: this toy base was built for another world than .*occupations_36.csv "
                                         r"\(the base draws 12 occupations, the file has 36\)"):
        check_base_world(REPO / "models" / "toy_base", load_world(toy36), toy36)
    rows = toy.read_text(encoding="utf-8").splitlines()
    swapped = tmp_path / "swapped.csv"
    swapped.write_text("\n".join([rows[0], rows[2], rows[1], *rows[3:]]) + "\n", encoding="utf-8")  # nurse before doctor
    with pytest.raises(InputError, match=r"occupations number 1: the base's 'doctor', the file's 'nurse'"):
        check_base_world(REPO / "models" / "toy_base", load_world(swapped), swapped)
    skewed = tmp_path / "skewed.csv"
    frame = pd.read_csv(toy, dtype=str, keep_default_na=False)
    world = load_world(toy)
    frame["majority_gender"], frame["majority_race"] = world.majority_genders, world.majority_races
    frame.to_csv(skewed, index=False)
    check_base_world(REPO / "models" / "toy_base", load_world(skewed), skewed)  # the same majorities, written out
    frame.loc[2, "majority_race"] = "white"
    frame.to_csv(skewed, index=False)
    with pytest.raises(InputError, match=r"another world than .*skewed.csv \(majority races number 3: the base's 'black', the file's 'white'\)"):
        check_base_world(REPO / "models" / "toy_base", load_world(skewed), skewed)
    # the order of the race labels (each one's skin colour): the error names the attribute file
    reordered = tmp_path / "attributes.json"
    attributes = json.loads((REPO / "data" / "toy" / "attributes.json").read_text(encoding="utf-8"))
    race = attributes["attributes"]["race"]
    race["values"] = dict(reversed(list(race["values"].items())))  # black, asian, white
    reordered.write_text(json.dumps(attributes), encoding="utf-8")
    with pytest.raises(InputError, match=r"another world than .*attributes.json \(race labels number 1: the base's 'white', the file's 'black'\)"):
        check_base_world(REPO / "models" / "toy_base", load_world(toy, reordered), toy, reordered)
    # a base measured before it recorded its world: its gates' neutral rows (occupations and majorities, in order)
    model = tmp_path / "base"
    model.mkdir()
    with pytest.raises(InputError, match=r"base: no toy pipeline there"):
        check_base_world(model, world, toy)
    (model / "model_index.json").write_text("{}", encoding="utf-8")
    check_base_world(model, load_world(swapped), swapped)  # no record at all: not checked
    shutil.copy(REPO / "models" / "toy_base" / "gates.json", model / "gates.json")
    check_base_world(model, world, toy)
    with pytest.raises(InputError, match=r"base/gates.json: .*occupations number 1: the base's 'doctor'"):
        check_base_world(model, load_world(swapped), swapped)
    script = load_script("train_toy_base")
    capsys.readouterr()
    assert script.main(["check", "--model", str(REPO / "models" / "toy_base"), "--occupations", str(toy36)]) == 2
    error = capsys.readouterr().err
    assert error.strip().count("\n") == 0 and "built for another world" in error
    assert script.main(["check", "--model", str(REPO / "models" / "toy_base")]) == 0
    assert script.main(["check", "--model", str(tmp_path / "typo")]) == 2


def test_an_assembled_base_records_its_world(tmp_path):
    from popalign.toy.base import assemble_pipeline

    source = tmp_path / "untrained"
    for component in ("vae", "unet"):
        (source / component).mkdir(parents=True)
        (source / component / "weights").write_text(component)
    (source / "model_index.json").write_text("{}")
    (tmp_path / "trained").mkdir()
    world = load_world(REPO / "data" / "toy" / "occupations_36.csv")
    base = assemble_pipeline(source, tmp_path / "trained", tmp_path / "base", world)
    assert json.loads((base / "toy_world.json").read_text(encoding="utf-8")) == world.record()
    check_base_world(base, world, "occupations_36.csv")
    with pytest.raises(InputError, match=r"toy_world.json: .*the base draws 36 occupations, the file has 12"):
        check_base_world(base, load_world(), "occupations.csv")


def test_a_majority_share_of_one_half_or_less_is_refused_before_any_stage(tmp_path, capsys):
    """The skew gate asks a base to keep each data set majority above 1/2, so a data set without one is refused."""
    script = load_script("train_toy_base")
    for flag, value in (("--gender_majority", "0.5"), ("--race_majority", "1.2"), ("--race_majority", "0.4")):
        assert script.main(["data", "--prompts", str(tmp_path / "p.csv"), "--out", str(tmp_path / "data"), flag, value]) == 2
        assert f"error: {flag} {float(value)}: the share of a majority, above 0.5 and at most 1" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()


def test_a_build_folder_of_another_world_is_refused_not_trained_on(tmp_path):
    script = load_script("train_toy_base")
    build = {"world": load_world().record(), "seed": 0, "gender_majority": 0.85}
    data = tmp_path / "data"
    assert not script.already_built(data, build, "train.csv")  # nothing built yet
    data.mkdir()
    (data / "train.csv").write_text("winner_path\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"holds a train.csv built without its record \(build.json\); use another folder"):
        script.already_built(data, build, "train.csv")
    (data / "build.json").write_text(json.dumps(build), encoding="utf-8")
    assert script.already_built(data, build, "train.csv")
    other = {**build, "world": load_world(REPO / "data" / "toy" / "occupations_36.csv").record(), "seed": 1}
    with pytest.raises(InputError, match=r"built with other settings \(seed, world\)"):
        script.already_built(data, other, "train.csv")


def test_the_study_refuses_a_run_folder_of_another_study_and_pairs_of_another_world(tmp_path, capsys):
    script = load_script("generalization")
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("winner_path,loser_path,caption\na.png,b.png,a photo of a doctor in a clinic\n", encoding="utf-8")
    run = tmp_path / "run"
    run.mkdir()
    fingerprint = {"pairs_sha256": file_sha256(pairs), "settings": {"pretrained_model": "models/toy_base"}}
    (run / "finished.json").write_text(json.dumps({"fingerprint": fingerprint}), encoding="utf-8")
    assert script.finished_elsewhere(run, pairs, "models/toy_base") == ""
    assert script.finished_elsewhere(run, pairs, "models/toy_base_36") == "it trained models/toy_base, not --pretrained_model models/toy_base_36"
    other = tmp_path / "other.csv"
    other.write_text("winner_path,loser_path,caption\na.png,b.png,a photo of a nurse in a ward\n", encoding="utf-8")
    assert script.finished_elsewhere(run, other, "models/toy_base").startswith(f"it trained on other pairs than {other}")
    assert script.finished_elsewhere(run, pairs, str((Path.cwd() / "models" / "toy_base").resolve())) == ""  # the same folder

    class Settings:
        pretrained_model = "models/toy_base_36"

    with pytest.raises(InputError, match=r"holds a finished run of another study \(it trained models/toy_base"):
        script.train(run, "popalign_unet", pairs, tmp_path / "validation.csv", 0, Settings())
    # pairs whose captions name none of the file's training occupations: refused before anything is measured
    out = tmp_path / "study"
    nurse_only = tmp_path / "nurse.csv"
    nurse_only.write_text("winner_path,loser_path,caption\na.png,b.png,a photo of a pilot in a cockpit\n", encoding="utf-8")
    capsys.readouterr()
    assert script.main(["--pairs_file", str(nurse_only), "--sizes", "1", "--methods", "sft", "--output_dir", str(out)]) == 2
    error = capsys.readouterr().err
    assert error.strip().count("\n") == 0 and "no pair is captioned with a neutral prompt of" in error
    assert not (out / "base_heldout.json").exists()
    # a base built for another world stops the study before it writes anything
    assert script.main(["--pairs_file", str(pairs), "--pretrained_model", str(REPO / "models" / "toy_base_36"),
                        "--output_dir", str(tmp_path / "study36")]) == 2
    assert "built for another world" in capsys.readouterr().err and not (tmp_path / "study36").exists()


def test_the_smallest_holm_p_of_a_study_by_hand():
    script = load_script("generalization")
    rows = [{"gender_min_p": 2 / 2**6, "race_min_p": 2 / 2**6}, {"gender_min_p": 2 / 2**5, "race_min_p": 2 / 2**6}]
    assert script.smallest_holm_p(rows) == pytest.approx(4 * 2 / 64)  # 6 held-out prompts, 4 tests: 0.125, never below 0.05
    assert script.smallest_holm_p(rows[:1] * 40) == 1.0
    twelve = [{"gender_min_p": 2 / 2**12, "race_min_p": 2 / 2**12}] * 4
    assert script.smallest_holm_p(twelve) == pytest.approx(8 / 2048)


def test_the_base_builder_stops_at_a_work_folder_built_for_another_world(tmp_path):
    """train_toy_base.sh with a new OCCUPATIONS in the WORK_DIR of an earlier build: exit 2 at the data stage, in one
    line, before a VAE or U-Net is trained on the earlier world's pictures."""
    work = tmp_path / "build"
    prompts = work / "prompts.csv"
    subprocess.run([sys.executable, "1_generate_diverse_prompts.py", "--input", "data/toy/occupations.csv", "--attributes",
                    "data/toy/attributes.json", "--axes", "gender,race", "--output", str(prompts)], cwd=REPO, check=True,
                   capture_output=True)
    script = load_script("train_toy_base")
    assert script.main(["data", "--prompts", str(prompts), "--out", str(work / "data"), "--images_per_neutral_prompt", "1",
                        "--images_per_identity_prompt", "1"]) == 0
    before = (work / "data" / "build.json").read_text(encoding="utf-8")
    other = tmp_path / "occupations.csv"
    other.write_text("occupation,activity\npilot,in a cockpit\nchef,in a kitchen\n", encoding="utf-8")
    result = subprocess.run(["bash", "scripts/train_toy_base.sh"], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OCCUPATIONS": str(other), "WORK_DIR": str(work),
                                 "OUT": str(tmp_path / "base"), "IMAGES_PER_NEUTRAL_PROMPT": "1", "IMAGES_PER_IDENTITY_PROMPT": "1",
                                 "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: --out {work / 'data'}: holds a train.csv built with other settings")
    assert "prompts_sha256" in result.stderr and "world" in result.stderr
    assert (work / "data" / "build.json").read_text(encoding="utf-8") == before
    assert not (work / "untrained").exists() and not (tmp_path / "base").exists()


def test_gate_failures_by_hand_and_on_the_shipped_bases():
    """A base's gates: identity accuracy >= 90%, and per neutral prompt the data set's majority gender and race each a
    strict majority of its clean figures. Hand rows first, then the measured gates.json of the three shipped bases
    (their READMEs: toy_base and toy_base_36_v2 pass; toy_base_36 is at 85.3% and keeps the skew on 34 of 36)."""
    from popalign.toy.base import gate_failures

    def row(occupation, gender_share, race_share):
        return {"occupation": occupation, "majority_gender": "male", "model_gender_share": gender_share,
                "majority_race": "white", "model_race_share": race_share}

    passing = {"identity_accuracy": 0.9, "identity_images": 10, "neutral": [row("doctor", 0.51, 0.51)]}
    assert gate_failures(passing) == []
    failing = {"identity_accuracy": 0.899, "identity_images": 1000, "neutral": [row("doctor", 0.5, 0.9), row("nurse", 0.8, float("nan")), row("chef", 0.8, 0.7)]}
    failures = gate_failures(failing)
    assert len(failures) == 3
    assert failures[0].startswith("identity gate: 89.9%")
    assert "'doctor'" in failures[1] and "male 50%" in failures[1] and "white" not in failures[1]
    assert "'nurse'" in failures[2] and "white nan%" in failures[2]
    assert gate_failures({"identity_accuracy": 0.0, "identity_images": 0, "neutral": []}) == [
        "identity gate: no identity-specific prompt was measured"]
    measured = {name: gate_failures(json.loads((REPO / "models" / name / "gates.json").read_text(encoding="utf-8")))
                for name in ("toy_base", "toy_base_36", "toy_base_36_v2")}
    assert measured["toy_base"] == [] and measured["toy_base_36_v2"] == []
    assert [failure.split(":")[0] for failure in measured["toy_base_36"]] == ["identity gate", "skew gate", "skew gate"]
    assert "'scientist'" in measured["toy_base_36"][1] and "'journalist'" in measured["toy_base_36"][2]
    # printed for a base (the failures given), not for a fine-tuned model (None)
    from popalign.toy.base import format_measurement

    gates_36 = json.loads((REPO / "models" / "toy_base_36" / "gates.json").read_text(encoding="utf-8"))
    assert format_measurement(gates_36, measured["toy_base_36"]).splitlines()[-3:] == measured["toy_base_36"]
    assert format_measurement(gates_36, []).splitlines()[-1] == "gates: both passed"
    assert "gate:" not in format_measurement(gates_36, None) and "gates:" not in format_measurement(gates_36, None)
