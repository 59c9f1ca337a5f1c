"""The toy world: rendered figures read back exactly, the toy classifier and quality score, the biased data set."""

import itertools

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from popalign.attributes import load_attributes
from popalign.classify import build_classifier
from popalign.io import InputError
from popalign.prompts import expand_prompts, read_neutral_prompts
from popalign.score import build_scorer
from popalign.toy.dataset import build_biased_dataset, neutral_skew
from popalign.toy.world import ToyWorld, load_world, read_figure, render_figure


@pytest.fixture(scope="module")
def world():
    return load_world()


def test_default_world_is_read_from_the_toy_files(world):
    assert world.occupations == ("doctor", "nurse", "engineer", "teacher", "chef", "lawyer",
                                 "pilot", "farmer", "baker", "scientist", "firefighter", "librarian")
    assert world.genders == ("male", "female")
    assert world.races == ("white", "asian", "black")


def test_every_rendered_figure_reads_back_exactly(world):
    rng = np.random.default_rng(0)
    for occupation, gender, race in itertools.product(world.occupations, world.genders, world.races):
        for _ in range(8):  # different positions, sizes, brightness, shading
            reading = read_figure(world, render_figure(world, occupation, gender, race, rng))
            assert reading.clean
            assert (reading.occupation, reading.gender, reading.race) == (occupation, gender, race)
            assert reading.gender_share == 1.0 and reading.race_share == 1.0 and reading.explained_share == 1.0


def test_renders_vary(world):
    rng = np.random.default_rng(0)
    pictures = {render_figure(world, "nurse", "female", "asian", rng).tobytes() for _ in range(20)}
    assert len(pictures) == 20


def test_an_unseen_configuration_reads_back_exactly(tmp_path):
    # Other occupations and all six race labels: nothing is tuned to the default world.
    (tmp_path / "occupations.csv").write_text("occupation,activity\npilot,in a cockpit\nchef,in a kitchen\n"
                                              "farmer,in a field\nlawyer,in a court\nbaker,at an oven\n", encoding="utf-8")
    world = load_world(tmp_path / "occupations.csv", "data/attributes.json")
    assert len(world.races) == 6
    rng = np.random.default_rng(1)
    for occupation, gender, race in itertools.product(world.occupations, world.genders, world.races):
        reading = read_figure(world, render_figure(world, occupation, gender, race, rng))
        assert reading.clean and (reading.occupation, reading.gender, reading.race) == (occupation, gender, race)


def test_a_world_of_more_occupations_than_colours_paints_two_tone_backgrounds_that_read_back_exactly():
    world = load_world("data/toy/occupations_36.csv")
    assert world.two_tone and len(world.occupations) == 36
    codes = world.background_codes
    assert len(set(codes)) == 36 and all(top != bottom for top, bottom in codes)
    assert codes[:3] == ((0, 1), (1, 2), (2, 3)) and codes[12] == (0, 2) and codes[35] == (11, 2)
    assert load_world().background_codes == tuple((index, index) for index in range(12))
    rng = np.random.default_rng(3)
    for occupation, gender, race in itertools.product(world.occupations, world.genders, world.races):
        picture = render_figure(world, occupation, gender, race, rng)
        pixels = np.asarray(picture)
        top, bottom = codes[world.occupations.index(occupation)]
        # the corners carry the two colours (up to shading and brightness)
        assert np.abs(pixels[0, 0] - world.background_colours[top]).max() <= 0.11 * 255
        assert np.abs(pixels[-1, -1] - world.background_colours[bottom]).max() <= 0.11 * 255
        reading = read_figure(world, picture)
        assert reading.clean and (reading.occupation, reading.gender, reading.race) == (occupation, gender, race)
        assert reading.occupation_share == 1.0 and reading.explained_share == 1.0


def test_a_blended_edge_between_the_two_tones_is_background_and_the_halves_vote_apart():
    world = load_world("data/toy/occupations_36.csv")
    picture = np.asarray(render_figure(world, "pilot", "female", "black", np.random.default_rng(4))).astype(np.float32)
    # a decoder's soft edge: the two rows around it become blends of the rows beside them
    picture[15:17] = (picture[14:16] + picture[16:18]) / 2
    reading = read_figure(world, Image.fromarray(picture.round().astype(np.uint8)))
    assert reading.clean and (reading.occupation, reading.gender, reading.race) == ("pilot", "female", "black")
    # occupations sharing pilot's top colour but not its bottom one get about half of the votes (the blended border
    # pixels of the edge rows vote for neither)
    top, bottom = world.background_codes[world.occupations.index("pilot")]
    sharing_top = [name for name, code in zip(world.occupations, world.background_codes) if code[0] == top and name != "pilot"]
    assert reading.occupation_votes["pilot"] >= 0.95
    assert sharing_top and all(0.45 <= reading.occupation_votes[name] <= 0.5 for name in sharing_top)


def test_no_skin_hue_is_near_the_blend_of_two_others():
    # A fine-tune that paints the average of two races must not be read as a third race, for any
    # number of races the toy world draws (the first k hues are used for k races).
    from popalign.toy.world import BACKGROUND_PALETTE, CLOTHING_PALETTE, PALETTE_TOLERANCE, SKIN_PALETTE

    for first, second in itertools.combinations(range(len(SKIN_PALETTE)), 2):
        blend = (SKIN_PALETTE[first] + SKIN_PALETTE[second]) / 2
        distances = np.linalg.norm(SKIN_PALETTE - blend, axis=1)
        assert distances.min() > 1.5 * PALETTE_TOLERANCE, (first, second)
    # Skin and clothing pixels are told apart by the nearest palette colour within the tolerance.
    assert np.linalg.norm(SKIN_PALETTE[:, None] - CLOTHING_PALETTE[None], axis=-1).min() > 2 * PALETTE_TOLERANCE
    assert np.linalg.norm(SKIN_PALETTE[:, None] - BACKGROUND_PALETTE[None], axis=-1).min() > PALETTE_TOLERANCE


def test_a_blend_of_two_races_reads_as_no_race():
    world = load_world("data/toy/occupations.csv", "data/attributes.json")  # six races
    for first, second in itertools.combinations(world.races, 2):
        left = np.asarray(render_figure(world, "doctor", "male", first, np.random.default_rng(3)), dtype=np.float32)
        right = np.asarray(render_figure(world, "doctor", "male", second, np.random.default_rng(3)), dtype=np.float32)
        reading = read_figure(world, Image.fromarray(((left + right) / 2).round().astype(np.uint8)))
        assert reading.race is None and not reading.clean, (first, second)


def test_noise_and_an_empty_background_are_not_clean_figures(world):
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    assert not read_figure(world, noise).clean
    empty = Image.new("RGB", (32, 32), (150, 200, 240))
    reading = read_figure(world, empty)
    assert not reading.clean and reading.occupation == "doctor"


def test_a_half_erased_figure_is_not_clean(world):
    picture = np.asarray(render_figure(world, "doctor", "male", "white", np.random.default_rng(0))).copy()
    picture[16:] = (150, 200, 240)  # paint the body over with the background
    assert not read_figure(world, Image.fromarray(picture)).clean


def test_too_many_occupations_or_too_few_races_is_an_input_error():
    with pytest.raises(InputError):
        ToyWorld(tuple(f"job{i}" for i in range(133)), ("",) * 133, ("male", "female"), ("white", "asian"))
    with pytest.raises(InputError):
        ToyWorld(("doctor",), ("",), ("male", "female"), ("white",))


def test_toy_classifier_backend(world):
    classifier = build_classifier("toy")
    rng = np.random.default_rng(2)
    pictures = [render_figure(world, "teacher", "female", "black", rng), Image.new("RGB", (32, 32), (0, 0, 0))]
    found, missing = classifier.classify(pictures)
    assert (found.face_detected, found.gender, found.race, found.gender_score, found.race_score) == (True, "female", "black", 1.0, 1.0)
    assert (missing.face_detected, missing.gender, missing.race) == (False, None, None)


def test_toy_classifier_reads_its_world_from_the_environment(tmp_path, monkeypatch):
    (tmp_path / "occupations.csv").write_text("occupation,activity\npilot,in a cockpit\nchef,\n", encoding="utf-8")
    monkeypatch.setenv("POPALIGN_TOY_OCCUPATIONS", str(tmp_path / "occupations.csv"))
    assert build_classifier("toy").world.occupations == ("pilot", "chef")


def test_toy_quality_score(world):
    scorer = build_scorer("toy")
    picture = render_figure(world, "nurse", "male", "white", np.random.default_rng(3))
    empty = Image.new("RGB", (32, 32), (165, 230, 150))  # the nurse background, no figure
    scores = scorer.score([picture, picture, picture, empty],
                          ["a photo of a nurse in a ward", "a photo of a doctor in a clinic", "a photo of a cat", "a photo of a nurse in a ward"])
    # (occupation share + clean + explained share) / 3
    assert scores == pytest.approx([1.0, 2 / 3, 2 / 3, (1.0 + 0.0 + 1.0) / 3])


def test_occupation_in_prompt_prefers_whole_words_and_longest_names():
    world = ToyWorld(("nurse", "head nurse", "doctor"), ("", "", ""), ("male", "female"), ("white", "asian"))
    assert world.occupation_in_prompt("a photo of a head nurse in a ward") == "head nurse"
    assert world.occupation_in_prompt("a photo of a nurse, smiling") == "nurse"
    assert world.occupation_in_prompt("a photo of doctors") is None


def test_neutral_skew_by_hand(world):
    genders, races = neutral_skew(world, "nurse", 0.85, 0.8)  # occupation 1: female majority, asian majority
    assert genders == pytest.approx({"male": 0.15, "female": 0.85})
    assert races == pytest.approx({"white": 0.1, "asian": 0.8, "black": 0.1})
    genders, races = neutral_skew(world, "engineer", 0.85, 0.8)  # occupation 2: male, black
    assert genders["male"] == pytest.approx(0.85) and races["black"] == pytest.approx(0.8)


def test_biased_data_set_has_the_skew_and_exact_identity_pictures(world, tmp_path):
    attributes = load_attributes("data/toy/attributes.json")
    prompts = expand_prompts(read_neutral_prompts("data/toy/occupations.csv"), attributes, ["gender", "race"])
    frame = build_biased_dataset(world, prompts, tmp_path, images_per_neutral_prompt=200, images_per_identity_prompt=3, seed=0)
    assert len(frame) == 12 * 200 + 72 * 3
    written = pd.read_csv(tmp_path / "train.csv", keep_default_na=False)
    assert list(written.columns[:3]) == ["winner_path", "loser_path", "caption"] and (written["loser_path"] == "").all()
    doctor = written[(written["kind"] == "neutral") & (written["occupation"] == "doctor")]
    assert 0.78 < (doctor["gender"] == "male").mean() < 0.92 and 0.72 < (doctor["race"] == "white").mean() < 0.88
    # Every picture shows what its row says.
    for row in written.sample(60, random_state=0).itertuples():
        reading = read_figure(world, Image.open(tmp_path / row.winner_path))
        assert (reading.occupation, reading.gender, reading.race) == (row.occupation, row.gender, row.race)
    identity = written[written["kind"] == "identity"].merge(prompts, left_on="caption", right_on="prompt", suffixes=("", "_prompted"))
    assert (identity["gender"] == identity["gender_prompted"]).all() and (identity["race"] == identity["race_prompted"]).all()


def test_the_vae_figure_weights_find_the_figure_on_a_two_tone_background_only_against_each_half():
    import torch

    from popalign.toy.model import figure_weights

    # 8x8: the top half red, the bottom half blue, one green pixel in each half
    picture = torch.empty(1, 3, 8, 8)
    picture[0, :, :4] = torch.tensor([1.0, -1.0, -1.0])[:, None, None]
    picture[0, :, 4:] = torch.tensor([-1.0, -1.0, 1.0])[:, None, None]
    picture[0, :, 2, 3] = picture[0, :, 5, 4] = torch.tensor([-1.0, 1.0, -1.0])
    by_halves = figure_weights(picture, split_row=4)[0]
    expected = torch.ones(8, 8)
    expected[2, 3] = expected[5, 4] = 5.0
    assert torch.equal(by_halves, expected)
    # one median over the whole border is (-1, -1, -1) here: neither red nor blue, so every pixel reads as figure
    assert torch.equal(figure_weights(picture)[0], torch.full((8, 8), 5.0))


def test_the_vae_figure_weights_by_halves_match_a_pixel_by_pixel_reading_of_the_two_tone_world():
    import torch

    from popalign.toy.model import figure_weights, random_pictures
    from popalign.toy.world import SPLIT_ROW

    pictures = random_pictures(load_world("data/toy/occupations_36.csv"), 6, np.random.default_rng(4))
    weights = figure_weights(pictures, figure_weight=3.0, split_row=SPLIT_ROW)
    array = pictures.numpy()
    size = array.shape[-1]
    # pixel by pixel: per half, the per-channel median (the lower middle value, as torch's) of its outer edge row and
    # its side columns
    for index, picture in enumerate(array):
        for top in (True, False):
            rows = range(SPLIT_ROW) if top else range(SPLIT_ROW, size)
            edge_row = 0 if top else size - 1
            border = [picture[:, edge_row, c] for c in range(size)] + [picture[:, r, c] for r in rows for c in (0, size - 1)]
            border = np.sort(np.array(border), axis=0)
            background = border[(len(border) - 1) // 2]
            for row in rows:
                for column in range(size):
                    figure = np.linalg.norm(picture[:, row, column] - background) > 0.2
                    assert weights[index, row, column].item() == (3.0 if figure else 1.0), (index, row, column)
    # a one-tone world's pictures get the same weights either way
    plain = random_pictures(load_world(), 6, np.random.default_rng(4))
    assert torch.equal(figure_weights(plain, split_row=SPLIT_ROW), figure_weights(plain))
