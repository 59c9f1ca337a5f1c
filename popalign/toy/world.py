"""The toy world: 32x32 pictures of a figure whose identity is drawn with big, redundant cues.

    occupation -> background colour (one per row of the toy occupation CSV, in file order); a world of more
                  occupations than the 12 background colours paints every background in two tones, the top half
                  in one colour and the bottom half in another, one pair of colours per occupation (up to 132)
    race       -> skin colour of a large round head and of both hands (one per race label, in
                  attribute-file order)
    gender     -> clothing colour AND clothing shape: the first gender label wears a wide
                  rectangular tunic in blue, the second a dress flaring from narrow shoulders in
                  magenta

Every picture varies: the figure moves by up to 2 pixels in each direction, its size by +-10%,
the whole picture's brightness by +-6% and the background carries a vertical shading of +-4%,
so a model has to learn a distribution, not copy one picture per prompt.

`read_figure` reads a picture back from its pixels alone: it takes the background from the
border (each half of it in a two-tone world), segments the figure as the pixels that differ from it, and assigns each figure pixel
to the nearest skin or clothing colour. On rendered pictures it is exact (tested); on generated
pictures it also says whether a clean figure is there at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from popalign.attributes import load_attributes
from popalign.io import InputError, csv_row_number, read_csv_checked
from popalign.prompts import read_neutral_prompts

IMAGE_SIZE = 32
REPO_ROOT = Path(__file__).resolve().parent.parent.parent
DEFAULT_OCCUPATIONS_PATH = REPO_ROOT / "data" / "toy" / "occupations.csv"
DEFAULT_ATTRIBUTES_PATH = REPO_ROOT / "data" / "toy" / "attributes.json"
# Optional columns of the occupation CSV: the identity an occupation's neutral prompt draws most often.
MAJORITY_GENDER_COLUMN = "majority_gender"
MAJORITY_RACE_COLUMN = "majority_race"

# Backgrounds far from every skin and clothing colour: light, cool or neutral ones first.
BACKGROUND_PALETTE = np.array([
    (150, 200, 240), (165, 230, 150), (205, 180, 240), (225, 225, 225),
    (130, 220, 210), (185, 205, 110), (240, 240, 120), (250, 175, 225),
    # Four more for worlds of up to 12 occupations, far from the colours above (>= 87) and at least 100 from
    # both clothing colours and the first three skin hues (>= 77 from the others). A dark green and a saturated green failed here: the toy VAE could not
    # round-trip a dark-skinned figure on the first or any figure on the second cleanly.
    (120, 120, 120), (130, 60, 210), (60, 160, 170), (250, 60, 190),
], dtype=np.float32)
# Skin hues, one per race label in the attribute file's order. No hue lies near the blend of two
# others (whatever the number of races drawn, 2 to 6): a model that paints a blend of two races (an
# average, not a choice) draws pixels that no race explains, which the reader counts as an unclean
# figure instead of a third race. (Tones from one light-to-dark ramp would read every light/dark
# blend as a middle race, so hues past the third leave the ramp: the toy world is not a photograph.)
SKIN_PALETTE = np.array([
    (250, 205, 165), (230, 135, 35), (95, 55, 30),
    (0, 255, 135), (150, 0, 255), (0, 120, 255),
], dtype=np.float32)
CLOTHING_PALETTE = np.array([(35, 60, 175), (195, 30, 105)], dtype=np.float32)
CLOTHING_SHAPES = ("tunic", "dress")
# In a two-tone world the background's top colour fills rows 0..SPLIT_ROW-1 and its bottom colour the rest, so the
# border holds 62 pixels of each. Near the edge, a decoded picture blends the two colours: there a pixel is background
# when it lies near the segment between them.
SPLIT_ROW = IMAGE_SIZE // 2
EDGE_ROWS = 2

# A pixel belongs to the figure when it is this far (RGB Euclidean) from the background colour.
FIGURE_DISTANCE = 45.0
# A figure pixel is "explained" when it is this close to its nearest skin or clothing colour.
PALETTE_TOLERANCE = 48.0
# Fewest pixels of skin and of clothing for a clean figure: about half of the smallest drawn head
# (radius 4.5) and of the smallest drawn body.
MIN_SKIN_PIXELS = 30
MIN_CLOTHING_PIXELS = 80
# A clean figure: at most this share of the picture is neither background nor a palette colour,
# and the winning skin and clothing colours each hold at least this share of their votes.
MAX_UNEXPLAINED_SHARE = 0.08
MIN_VOTE_SHARE = 0.6


@dataclass(frozen=True)
class ToyWorld:
    """Which colours and shapes stand for which occupation, gender and race label, and which identity each
    occupation's neutral prompt draws most often in the biased training set (toy/dataset.py).

    majority_genders / majority_races: one label per occupation; left empty, occupation number i (from 0, in file
    order) gets genders[i % 2] and races[i % R] (R race labels), so neighbouring rows differ.
    """

    occupations: tuple[str, ...]
    activities: tuple[str, ...]
    genders: tuple[str, ...]
    races: tuple[str, ...]
    majority_genders: tuple[str, ...] = ()
    majority_races: tuple[str, ...] = ()

    def __post_init__(self):
        most = len(BACKGROUND_PALETTE) * (len(BACKGROUND_PALETTE) - 1)
        if len(self.occupations) > most:
            raise InputError(f"the toy world draws at most {most} occupations, got {len(self.occupations)}")
        if len(self.races) > len(SKIN_PALETTE) or len(self.races) < 2:
            raise InputError(f"the toy world draws 2 to {len(SKIN_PALETTE)} races, got {len(self.races)}")
        if len(self.genders) != len(CLOTHING_PALETTE):
            raise InputError(f"the toy world draws exactly {len(CLOTHING_PALETTE)} genders, got {len(self.genders)}")
        for name, labels in (("majority_genders", self.genders), ("majority_races", self.races)):
            given = getattr(self, name)
            if not given:
                object.__setattr__(self, name, tuple(labels[index % len(labels)] for index in range(len(self.occupations))))
            elif len(given) != len(self.occupations) or not set(given) <= set(labels):
                raise ValueError(f"{name}: one of {', '.join(labels)} per occupation ({len(self.occupations)}), got {given}")

    def record(self) -> dict:
        """What a toy base is built for, as JSON: every label and its order (which sets its colour) and each
        occupation's majority identity."""
        return {"occupations": list(self.occupations), "genders": list(self.genders), "races": list(self.races),
                "majority_genders": list(self.majority_genders), "majority_races": list(self.majority_races)}

    @property
    def two_tone(self) -> bool:
        """Whether backgrounds are painted in two colours (more occupations than background colours)."""
        return len(self.occupations) > len(BACKGROUND_PALETTE)

    @property
    def background_codes(self) -> tuple[tuple[int, int], ...]:
        """Each occupation's (top, bottom) index into `background_colours`, in file order.

        One colour each while the palette lasts: occupation k -> (k, k). Beyond it, every occupation is two-tone:
        k -> (k mod P, (k mod P + 1 + k div P) mod P) with P = 12 colours, so the first P occupations pair each
        colour with its neighbour, the next P with the colour two along, and so on; no two occupations share a pair
        and no background is one colour.
        """
        count = len(self.occupations)
        if not self.two_tone:
            return tuple((index, index) for index in range(count))
        size = len(BACKGROUND_PALETTE)
        return tuple((index % size, (index % size + 1 + index // size) % size) for index in range(count))

    @property
    def background_colours(self) -> np.ndarray:
        """The palette colours that this world's backgrounds use."""
        return BACKGROUND_PALETTE[: min(len(self.occupations), len(BACKGROUND_PALETTE))]

    @property
    def skin_colours(self) -> np.ndarray:
        return SKIN_PALETTE[: len(self.races)]

    def occupation_in_prompt(self, prompt: str) -> str | None:
        """The occupation named in a prompt (whole word; the longest name wins), or None."""
        words = f" {' '.join(prompt.lower().replace(',', ' ').split())} "
        named = [name for name in self.occupations if f" {name.lower()} " in words]
        return max(named, key=len) if named else None


def load_world(occupations_path: str | Path | None = None, attributes_path: str | Path | None = None) -> ToyWorld:
    """The toy world of an occupation CSV (occupation, activity; optional majority_gender, majority_race: the identity
    the occupation's neutral prompt draws most often, else the file-order rule of ToyWorld) and an attribute file
    (gender, race)."""
    path = occupations_path or DEFAULT_OCCUPATIONS_PATH
    neutral = read_neutral_prompts(path)
    attributes = load_attributes(attributes_path or DEFAULT_ATTRIBUTES_PATH)
    occupations = list(neutral["occupation"])
    seen: dict[str, int] = {}
    for position, name in enumerate(occupations):
        if seen.setdefault(name.lower(), position) != position:
            raise InputError(f"{path}: row {csv_row_number(position)}: {name} again (row {csv_row_number(seen[name.lower()])}); "
                             "each toy occupation needs its own row (it has its own colour)")
    genders, races = tuple(attributes["gender"].labels), tuple(attributes["race"].labels)
    columns = read_csv_checked(path, ["occupation"])
    majorities = {}
    for column, labels in ((MAJORITY_GENDER_COLUMN, genders), (MAJORITY_RACE_COLUMN, races)):
        if column not in columns.columns:
            majorities[column] = ()
            continue
        values = tuple(value.strip() for value in columns[column])
        for position, value in enumerate(values):
            if value not in labels:
                raise InputError(f"{path}: row {csv_row_number(position)}: {column} {value!r} is not one of "
                                 f"{', '.join(labels)} (the attribute file's labels)")
        majorities[column] = values
    return ToyWorld(tuple(occupations), tuple(neutral["activity"]), genders, races,
                    majorities[MAJORITY_GENDER_COLUMN], majorities[MAJORITY_RACE_COLUMN])


def render_figure(world: ToyWorld, occupation: str, gender: str, race: str, rng: np.random.Generator) -> Image.Image:
    """Draw one 32x32 picture; position, size, brightness and background shading come from `rng`."""
    top, bottom = world.background_codes[world.occupations.index(occupation)]
    skin = world.skin_colours[world.races.index(race)]
    gender_index = world.genders.index(gender)
    clothing = CLOTHING_PALETTE[gender_index]
    shift_x, shift_y = rng.integers(-2, 3, size=2)
    scale = rng.uniform(0.9, 1.1)
    brightness = rng.uniform(0.94, 1.06)
    shading = rng.uniform(-0.04, 0.04)

    rows, cols = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32) + 0.5
    background = np.where((rows < SPLIT_ROW)[..., None], world.background_colours[top], world.background_colours[bottom])
    picture = background * (1.0 + shading * (rows[..., None] - IMAGE_SIZE / 2) / (IMAGE_SIZE / 2))
    centre_x = IMAGE_SIZE / 2 + shift_x
    head_y = 8.5 + shift_y
    head_radius = 5.2 * scale
    body_top = head_y + head_radius - 0.5
    body_bottom = min(body_top + 15.0 * scale, IMAGE_SIZE - 3.0)
    depth = np.clip((rows - body_top) / max(body_bottom - body_top, 1.0), 0.0, 1.0)
    in_rows = (rows >= body_top) & (rows <= body_bottom)
    if CLOTHING_SHAPES[gender_index] == "tunic":
        half_width = 7.0 * scale * np.ones_like(rows)
    else:
        half_width = (3.0 + 7.0 * depth) * scale
    body = in_rows & (np.abs(cols - centre_x) <= half_width)
    # Hands at the bottom of the sleeves, outside the clothing, in skin colour.
    hand_y = body_top + 7.0 * scale
    hand_offset = half_width.max() if CLOTHING_SHAPES[gender_index] == "tunic" else 7.5 * scale
    hands = ((np.abs(rows - hand_y) <= 1.6 * scale)
             & (np.abs(np.abs(cols - centre_x) - (hand_offset + 1.5 * scale)) <= 1.5 * scale))
    head = (rows - head_y) ** 2 + (cols - centre_x) ** 2 <= head_radius ** 2
    picture[body] = clothing
    picture[hands & ~body] = skin
    picture[head] = skin
    picture = np.clip(picture * brightness, 0, 255).round().astype(np.uint8)
    return Image.fromarray(picture, mode="RGB")


@dataclass(frozen=True)
class FigureReading:
    """What the pixels of one picture show."""

    clean: bool             # a figure with enough skin and clothing, little else
    occupation: str         # the background colour's occupation (always read)
    occupation_share: float  # share of border pixels nearest that occupation's colour (mean of the two halves' shares, two-tone)
    gender: str | None
    gender_share: float     # share of clothing pixels voting for `gender`
    race: str | None
    race_share: float       # share of skin pixels voting for `race`
    explained_share: float  # share of pixels that are background or a skin/clothing colour
    occupation_votes: dict  # occupation -> its occupation_share


def _border(pixels: np.ndarray) -> np.ndarray:
    return np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])


def _nearest(colours: np.ndarray, palette: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of the nearest palette colour for each of the (N, 3) colours, and its distance."""
    distances = np.linalg.norm(colours[:, None, :] - palette[None, :, :], axis=-1)
    return distances.argmin(axis=1), distances.min(axis=1)


def _distance_to_segment(colours: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """RGB distance of each of the (..., 3) colours to the segment of blends between `start` and `end`."""
    direction = end - start
    weight = np.clip(((colours - start) @ direction) / max(float(direction @ direction), 1e-9), 0.0, 1.0)
    return np.linalg.norm(colours - (start + weight[..., None] * direction), axis=-1)


def _read_background(world: ToyWorld, pixels: np.ndarray) -> tuple[dict, np.ndarray]:
    """Each occupation's share of border votes, and every pixel's RGB distance from the background.

    One-colour world: each border pixel votes for its nearest background colour; the background is the border's
    median colour. Two-tone world: the top and the bottom half of the border vote separately, an occupation's share
    is the mean of its top colour's share in the top half and its bottom colour's in the bottom half, each half's
    background is the median of its half of the border, and in the EDGE_ROWS rows on each side of the edge a pixel's
    distance is to the nearest blend of the two.
    """
    border = _border(pixels)
    if not world.two_tone:
        border_votes, _ = _nearest(border, world.background_colours)
        border_counts = np.bincount(border_votes, minlength=len(world.occupations)) / len(border_votes)
        distance = np.linalg.norm(pixels - np.median(border, axis=0), axis=-1)
        return {name: float(share) for name, share in zip(world.occupations, border_counts)}, distance
    row_of_pixel = np.broadcast_to(np.arange(IMAGE_SIZE)[:, None], (IMAGE_SIZE, IMAGE_SIZE))
    in_top = _border(row_of_pixel) < SPLIT_ROW
    halves = [border[in_top], border[~in_top]]
    shares = []
    for half in halves:
        votes, _ = _nearest(half, world.background_colours)
        shares.append(np.bincount(votes, minlength=len(world.background_colours)) / len(votes))
    occupation_votes = {name: float((shares[0][top] + shares[1][bottom]) / 2)
                        for name, (top, bottom) in zip(world.occupations, world.background_codes)}
    top_colour, bottom_colour = (np.median(half, axis=0) for half in halves)
    background = np.where((row_of_pixel < SPLIT_ROW)[..., None], top_colour, bottom_colour)
    distance = np.linalg.norm(pixels - background, axis=-1)
    edge = slice(SPLIT_ROW - EDGE_ROWS, SPLIT_ROW + EDGE_ROWS)
    distance[edge] = np.minimum(distance[edge], _distance_to_segment(pixels[edge], top_colour, bottom_colour))
    return occupation_votes, distance


def read_figure(world: ToyWorld, image: Image.Image) -> FigureReading:
    """Read occupation, gender and race back from the pixels of one picture (any size, resized to 32x32)."""
    image = image.convert("RGB")
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
        image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
    pixels = np.asarray(image, dtype=np.float32)
    occupation_votes, background_distance = _read_background(world, pixels)
    occupation_index = int(np.argmax([occupation_votes[name] for name in world.occupations]))
    occupation_share = occupation_votes[world.occupations[occupation_index]]

    flat = pixels.reshape(-1, 3)
    figure = (background_distance > FIGURE_DISTANCE).reshape(-1)
    figure_palette = np.concatenate([world.skin_colours, CLOTHING_PALETTE])
    nearest, distance = _nearest(flat[figure], figure_palette)
    explained = distance <= PALETTE_TOLERANCE
    skin_votes = nearest[explained & (nearest < len(world.races))]
    clothing_votes = nearest[explained & (nearest >= len(world.races))] - len(world.races)
    explained_share = 1.0 - float((~explained).sum()) / flat.shape[0]

    race, race_share = None, 0.0
    if len(skin_votes):
        counts = np.bincount(skin_votes, minlength=len(world.races))
        race, race_share = world.races[int(counts.argmax())], float(counts.max() / counts.sum())
    gender, gender_share = None, 0.0
    if len(clothing_votes):
        counts = np.bincount(clothing_votes, minlength=len(world.genders))
        gender, gender_share = world.genders[int(counts.argmax())], float(counts.max() / counts.sum())
    clean = bool(len(skin_votes) >= MIN_SKIN_PIXELS and len(clothing_votes) >= MIN_CLOTHING_PIXELS
                 and 1.0 - explained_share <= MAX_UNEXPLAINED_SHARE
                 and race_share >= MIN_VOTE_SHARE and gender_share >= MIN_VOTE_SHARE)
    return FigureReading(clean, world.occupations[occupation_index], occupation_share, gender, gender_share,
                         race, race_share, explained_share, occupation_votes)
