"""Bad input is one line naming the file or flag, exit code 2, and nothing already written changes."""

import importlib.util
import json
from pathlib import Path

import pytest
from PIL import Image

from popalign.attributes import load_attributes
from popalign.io import InputError

REPO_ROOT = Path(__file__).resolve().parent.parent


def root_script(name: str):
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py").replace("-", "_"), REPO_ROOT / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def one_error_line(capsys) -> str:
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ")
    return line


def test_step_1_with_a_file_where_the_output_folder_should_be(tmp_path, capsys):
    (tmp_path / "prompts").write_text("a file, not a folder")
    (tmp_path / "neutral.csv").write_text("occupation,activity\ndoctor,\n")
    before = snapshot(tmp_path)
    code = root_script("1_generate_diverse_prompts.py").main(["--input", str(tmp_path / "neutral.csv"), "--output",
                                                              str(tmp_path / "prompts" / "out.csv")])
    assert code == 2 and f"--output {tmp_path / 'prompts' / 'out.csv'}: {tmp_path / 'prompts'} is a file, not a folder" in one_error_line(capsys)
    assert snapshot(tmp_path) == before


def test_step_3_with_a_folder_where_the_pairs_file_should_be(tmp_path, capsys):
    (tmp_path / "pairs.csv").mkdir()
    code = root_script("3_generate_preferences.py").main(["--image_dirs", str(tmp_path), "--output", str(tmp_path / "pairs.csv")])
    assert code == 2 and "a folder is in the way" in one_error_line(capsys)


def test_the_report_with_a_file_where_its_folder_should_be(tmp_path, capsys):
    from popalign.evaluate import main

    (tmp_path / "report").write_text("a file")
    assert main(["--base", str(tmp_path), "--report_dir", str(tmp_path / "report")]) == 2
    assert "--output_dir" in one_error_line(capsys) and (tmp_path / "report").read_text() == "a file"


@pytest.mark.parametrize("content, message", [
    ([1, 2], "expected an object with a non-empty 'attributes' object"),
    ({"attributes": ["gender"]}, "expected an object with a non-empty 'attributes' object"),
    ({"attributes": {"gender": ["male", "female"]}}, "attribute 'gender' must be an object with 'values'"),
    ({"attributes": {"gender": {"values": {"male": "male"}, "classifier_labels": ["Man"]}}}, "'classifier_labels' must map"),
    ({"attributes": {"gender": {"values": {"male": "male"}}}, "word_order": "gender"}, "'word_order' must be a list"),
])
def test_attribute_files_of_the_wrong_shape(tmp_path, content, message):
    path = tmp_path / "attributes.json"
    path.write_text(json.dumps(content))
    with pytest.raises(InputError, match=f"{path}: .*{message}"):
        load_attributes(path)


def test_a_truncated_image_is_named_when_classified(tmp_path):
    from popalign.image_jobs import load_rgb

    path = tmp_path / "00000.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(path)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(InputError, match=f"{path}: not a readable image .* re-run generation"):
        load_rgb(path)
    (tmp_path / "text.png").write_text("not a picture")
    with pytest.raises(InputError, match="text.png: not a readable image"):
        load_rgb(tmp_path / "text.png")
