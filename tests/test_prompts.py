import re
import subprocess
import sys

import pandas as pd
import pytest

from popalign.attributes import load_attributes
from popalign.io import InputError
from popalign.prompts import expand_prompts, indefinite_article, parse_restrictions, prompt_id, read_neutral_prompts


@pytest.fixture(scope="module")
def attributes():
    return load_attributes()


@pytest.mark.parametrize("word, article", [("Asian", "an"), ("Indian", "an"), ("white", "a"), ("Black", "a"),
                                           ("engineer", "an"), ("doctor", "a"), ("umpire", "an"), ("university", "a"),
                                           ("hour", "an"), ("Middle", "a"), ("old", "an"), ("European", "a")])
def test_indefinite_article(word, article):
    assert indefinite_article(word) == article


def test_expansion_rows_grammar_and_columns(attributes):
    neutral = pd.DataFrame({"occupation": ["engineer", "nurse"], "activity": ["fixing a pump", ""]})
    table = expand_prompts(neutral, attributes, ["gender", "race"])
    assert len(table) == 2 * (1 + 2 * 6)
    first = table.iloc[0]
    assert (first["kind"], first["prompt"]) == ("neutral", "a photo of an engineer fixing a pump")
    row = table[(table["gender"] == "female") & (table["race"] == "asian") & (table["occupation"] == "engineer")].iloc[0]
    assert row["prompt"] == "a photo of an Asian female engineer fixing a pump"
    assert row["neutral_prompt"] == "a photo of an engineer fixing a pump"
    white = table[(table["gender"] == "male") & (table["race"] == "white") & (table["occupation"] == "nurse")].iloc[0]
    assert white["prompt"] == "a photo of a white male nurse"  # empty activity leaves no trailing space
    assert set(table.loc[table["kind"] == "neutral", "gender"]) == {""}
    assert set(table["age"]) == {""}
    assert table["prompt_id"].tolist() == [prompt_id(text) for text in table["prompt"]]
    # identity and neutral prompts differ only in the identity words
    for prompt, neutral_prompt in zip(table["prompt"], table["neutral_prompt"]):
        assert prompt.replace("a photo of ", "").endswith(neutral_prompt.replace("a photo of a ", "").replace("a photo of an ", ""))


def test_axes_subset_age_and_restriction(attributes):
    neutral = pd.DataFrame({"occupation": ["chef"], "activity": ["plating a dish"]})
    table = expand_prompts(neutral, attributes, ["age", "gender"])
    assert sorted(table.loc[table["kind"] == "identity", "prompt"])[0] == "a photo of a middle-aged female chef plating a dish"
    assert set(table["race"]) == {""}
    restricted = expand_prompts(neutral, attributes, ["gender", "race"], restrictions=parse_restrictions(["race=white,asian,black"], attributes))
    assert len(restricted) == 1 + 6
    assert set(restricted["race"]) == {"", "white", "asian", "black"}


def test_unseen_prompt_file_through_the_script(tmp_path, repo_root):
    source = tmp_path / "prompts.csv"
    source.write_text('occupation,activity\n"umpire","calling a ""strike"", in the rain"\nélectricien,"réparant un câble"\n'
                      "architect,\n", encoding="utf-8")
    output = tmp_path / "out.csv"
    result = subprocess.run([sys.executable, "1_generate_diverse_prompts.py", "--input", str(source), "--output", str(output),
                             "--axes", "race"], cwd=repo_root, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    table = pd.read_csv(output, dtype=str, keep_default_na=False)
    assert len(table) == 3 * 7
    prompts = set(table["prompt"])
    assert 'a photo of an umpire calling a "strike", in the rain' in prompts
    assert 'a photo of an Indian umpire calling a "strike", in the rain' in prompts
    assert "a photo of a Middle Eastern électricien réparant un câble" in prompts
    assert "a photo of a Latino Hispanic architect" in prompts
    assert "a photo of an architect" in prompts


@pytest.mark.parametrize("content, message", [
    ("occupation,activity\ndoctor,x\n,y\n", "row 3: empty occupation"),
    ("occupation,activity\ndoctor,x\nDoctor,X\n", "row 3: duplicate prompt (same as row 2)"),
    ("occupation\ndoctor\n", "missing column(s) activity"),
    ("occupation,activity\n", "no prompts"),
])
def test_bad_prompt_files(tmp_path, content, message):
    path = tmp_path / "bad.csv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(InputError, match=re.escape(message)) as error:
        read_neutral_prompts(path)
    assert str(path) in str(error.value)


def test_bad_flags(attributes, tmp_path, repo_root):
    neutral = pd.DataFrame({"occupation": ["chef"], "activity": [""]})
    with pytest.raises(InputError, match="unknown attribute 'religion'"):
        expand_prompts(neutral, attributes, ["religion"])
    with pytest.raises(InputError, match="unknown race value"):
        parse_restrictions(["race=martian"], attributes)
    result = subprocess.run([sys.executable, "1_generate_diverse_prompts.py", "--input", str(tmp_path / "missing.csv"),
                             "--output", str(tmp_path / "o.csv")], cwd=repo_root, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {tmp_path / 'missing.csv'}: file not found"
    assert not (tmp_path / "o.csv").exists()


def test_default_training_prompts_are_valid_and_neutral(attributes, repo_root):
    neutral = read_neutral_prompts(repo_root / "data" / "training_prompts.csv")
    assert neutral["occupation"].str.lower().nunique() >= 100
    identity_words = {"man", "woman", "male", "female", "boy", "girl", "his", "her", "he", "she", "young", "old",
                      "elderly", "asian", "black", "white", "indian", "latino", "hispanic"}
    for occupation, activity in zip(neutral["occupation"], neutral["activity"]):
        words = set(f"{occupation} {activity}".lower().replace(",", " ").split())
        assert not words & identity_words, (occupation, activity)


def test_split_of_a_prompt_file(tmp_path, repo_root):
    from popalign.prompts import occupation_splits

    source = tmp_path / "prompts.csv"
    source.write_text("occupation,activity,split\npilot,in a cockpit,train\nchef,in a kitchen,heldout\n"
                      "baker,,train\n", encoding="utf-8")
    assert list(read_neutral_prompts(source, "train")["occupation"]) == ["pilot", "baker"]
    assert list(read_neutral_prompts(source)["occupation"]) == ["pilot", "chef", "baker"]
    assert occupation_splits(source) == {"pilot": "train", "chef": "heldout", "baker": "train"}
    with pytest.raises(InputError, match="no row has it"):
        read_neutral_prompts(source, "test")
    output = tmp_path / "out.csv"
    result = subprocess.run([sys.executable, "1_generate_diverse_prompts.py", "--input", str(source), "--split", "heldout",
                             "--output", str(output), "--axes", "gender"], cwd=repo_root, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert set(pd.read_csv(output, dtype=str, keep_default_na=False)["occupation"]) == {"chef"}
    plain = tmp_path / "plain.csv"
    plain.write_text("occupation,activity\npilot,in a cockpit\n", encoding="utf-8")
    with pytest.raises(InputError, match="has no 'split' column"):
        read_neutral_prompts(plain, "train")
    source.write_text("occupation,activity,split\npilot,in a cockpit,train\npilot,in the air,heldout\n", encoding="utf-8")
    with pytest.raises(InputError, match="row 3: pilot is in two splits"):
        occupation_splits(source)
    # The toy world's file: 4 occupations to train on, 2 to choose settings on, 6 held out.
    toy = occupation_splits(repo_root / "data" / "toy" / "occupations.csv")
    assert [list(toy.values()).count(split) for split in ("train", "validation", "heldout")] == [4, 2, 6]
