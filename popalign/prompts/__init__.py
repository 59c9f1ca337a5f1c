"""Step 1: expand identity-neutral prompts into identity-specific variants.

A neutral prompt and its identity variants come from ONE template and differ only in the
identity words, so that the preference data never confounds identity with style:

    neutral:  "a photo of a doctor reading an x-ray"
    identity: "a photo of an Asian female doctor reading an x-ray"
"""

from __future__ import annotations

import hashlib
import itertools
import re
import string
from typing import Sequence

import pandas as pd

from popalign.attributes import AttributeSet
from popalign.image_folder import ATTRIBUTE_COLUMNS, PROMPT_KINDS
from popalign.io import InputError, csv_row_number, read_csv_checked

DEFAULT_TEMPLATE = "a photo of {person} {activity}"
PROMPT_COLUMNS = ["prompt_id", "kind", "prompt", "neutral_prompt", "occupation", "activity"]

# Words that start with a vowel letter but a consonant sound, and the reverse.
_CONSONANT_SOUND = ("uni", "use", "usu", "eu", "one", "once", "ubiq", "uro", "ufo")
_VOWEL_SOUND = ("hour", "honest", "honor", "honour", "heir", "mba", "mri", "x-ray", "fbi", "nba", "nhs")


def indefinite_article(word: str) -> str:
    """'a' or 'an' for the word that follows, by its sound: an Asian, a white, an engineer, a university."""
    lowered = word.lower()
    if lowered.startswith(_VOWEL_SOUND):
        return "an"
    if lowered.startswith(_CONSONANT_SOUND):
        return "a"
    return "an" if lowered[:1] in set("aeiou") else "a"


def person_phrase(occupation: str, identity_words: Sequence[str]) -> str:
    """'an Indian male engineer' from ('Indian', 'male') and 'engineer', with the right article."""
    words = [*identity_words, occupation]
    return f"{indefinite_article(words[0])} {' '.join(words)}"


TEMPLATE_FIELDS = ("person", "activity")


def check_template(template: str) -> None:
    """A template holds plain text, `{person}` (required) and `{activity}`; `{{` and `}}` are literal braces.
    InputError naming --template for a lone brace, another field, a format spec or conversion, or a field reached
    through attributes or indexing (`{person.__class__}` would write Python's internals into the prompts)."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as error:
        raise InputError(f"--template {template!r}: {error} (write a literal brace as {{{{ or }}}})") from None
    fields = [(name, spec, conversion) for _, name, spec, conversion in parsed if name is not None]
    for name, spec, conversion in fields:
        if name not in TEMPLATE_FIELDS:
            raise InputError(f"--template {template!r}: unknown field {{{name}}} (known: {{person}}, {{activity}}; "
                             "a literal brace is {{ or }})")
        if spec or conversion:
            raise InputError(f"--template {template!r}: field {{{name}}} takes no format spec or conversion")
    if "person" not in [name for name, _, _ in fields]:
        raise InputError(f"--template {template!r}: must contain {{person}}")


def render_prompt(template: str, occupation: str, activity: str, identity_words: Sequence[str] = ()) -> str:
    """Fill the template; collapses the doubled spaces an empty activity would leave."""
    text = template.format(person=person_phrase(occupation, identity_words), activity=activity)
    return re.sub(r"\s+", " ", text).strip().rstrip(",").strip()


def prompt_id(prompt: str) -> str:
    """A file-name-safe identifier of a prompt: 16 hex digits of its SHA-256."""
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:16]


def parse_restrictions(specs: Sequence[str], attributes: AttributeSet) -> dict[str, list[str]]:
    """Parse ['race=white,asian,black'] into {'race': [...]}, checking every name and value."""
    restrictions: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, values = spec.partition("=")
        name = name.strip()
        if not sep or name not in attributes.attributes:
            raise InputError(f"--restrict {spec!r}: expected NAME=VALUE[,VALUE...] with NAME in {', '.join(attributes.names)}")
        chosen = [value.strip() for value in values.split(",") if value.strip()]
        unknown = [value for value in chosen if value not in attributes[name].labels]
        if unknown or not chosen:
            raise InputError(f"--restrict {spec!r}: unknown {name} value(s) {unknown} (known: {', '.join(attributes[name].labels)})")
        restrictions[name] = chosen
    return restrictions


SPLIT_COLUMN = "split"
SPLIT_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def read_neutral_prompts(path, split: str | None = None) -> pd.DataFrame:
    """Read and validate the neutral prompt file: columns occupation, activity; no empty or duplicate rows; where
    the optional `split` column is present, every row has one and an occupation has one split (occupation_splits).

    With `split`, only the rows whose `split` column holds that value (e.g. train / heldout). Cells are compared
    without their surrounding spaces; every row is checked and named by its line in the file, whatever `split`.
    """
    frame = read_csv_checked(path, ["occupation", "activity"])
    if frame.empty:
        raise InputError(f"{path}: no prompts")
    seen: dict[tuple[str, str], int] = {}
    for position, (occupation, activity) in enumerate(zip(frame["occupation"], frame["activity"])):
        row = csv_row_number(position)
        occupation, activity = occupation.strip(), activity.strip()
        if not occupation:
            raise InputError(f"{path}: row {row}: empty occupation")
        key = (occupation.lower(), activity.lower())
        if key in seen:
            raise InputError(f"{path}: row {row}: duplicate prompt (same as row {seen[key]}): {occupation} {activity}")
        seen[key] = row
    frame = frame.assign(occupation=frame["occupation"].str.strip(), activity=frame["activity"].str.strip())
    if SPLIT_COLUMN in frame.columns:
        splits = _checked_splits(frame, path)
        frame = frame.assign(**{SPLIT_COLUMN: frame[SPLIT_COLUMN].str.strip()})
    split = (split or "").strip()
    if split:
        if SPLIT_COLUMN not in frame.columns:
            raise InputError(f"{path}: --split {split}: the file has no '{SPLIT_COLUMN}' column")
        if split not in set(splits.values()):
            raise InputError(f"{path}: --split {split}: no row has it (splits: {', '.join(sorted(set(splits.values())))})")
        frame = frame[frame[SPLIT_COLUMN] == split].reset_index(drop=True)
    return frame[["occupation", "activity"]]


def occupation_splits(path) -> dict[str, str]:
    """occupation -> split, from a neutral prompt file with a `split` column (an occupation has one split; names that
    differ only in case are one occupation)."""
    return _checked_splits(read_csv_checked(path, ["occupation", SPLIT_COLUMN]), path)


def _checked_splits(frame: pd.DataFrame, path) -> dict[str, str]:
    """occupation_splits of a file already read: one non-empty split name per row and per occupation."""
    splits: dict[str, str] = {}
    by_name: dict[str, str] = {}
    for position, (occupation, split) in enumerate(zip(frame["occupation"].str.strip(), frame[SPLIT_COLUMN].str.strip())):
        if not split:
            raise InputError(f"{path}: row {csv_row_number(position)}: empty split")
        if not SPLIT_NAME.fullmatch(split):
            raise InputError(f"{path}: row {csv_row_number(position)}: split {split!r}: use letters, digits, '_', '.' or '-' "
                             "(a split names its report's folder, report_<split>)")
        if by_name.setdefault(occupation.lower(), split) != split:
            raise InputError(f"{path}: row {csv_row_number(position)}: {occupation} is in two splits "
                             f"({by_name[occupation.lower()]}, {split})")
        splits[occupation] = split
    return splits


def expand_prompts(
    neutral: pd.DataFrame,
    attributes: AttributeSet,
    axes: Sequence[str],
    template: str = DEFAULT_TEMPLATE,
    restrictions: dict[str, list[str]] | None = None,
) -> pd.DataFrame:
    """One neutral row per input row, then one identity row per combination of the `axes` values.

    Rows are ordered neutral prompt by neutral prompt; the attribute columns hold labels.
    """
    if not axes:
        raise InputError("--axes: name at least one attribute")
    for name in axes:
        if name not in attributes.attributes:
            raise InputError(f"--axes: unknown attribute {name!r} (known: {', '.join(attributes.names)})")
    check_template(template)
    restrictions = restrictions or {}
    ordered_axes = [name for name in attributes.word_order if name in axes]
    value_lists = [restrictions.get(name, attributes[name].labels) for name in ordered_axes]
    rows = []
    for occupation, activity in zip(neutral["occupation"], neutral["activity"]):
        neutral_prompt = render_prompt(template, occupation, activity)
        empty_attributes = {name: "" for name in attributes.names}
        rows.append({"kind": "neutral", "prompt": neutral_prompt, "neutral_prompt": neutral_prompt,
                     "occupation": occupation, "activity": activity, **empty_attributes})
        for combination in itertools.product(*value_lists):
            words = [attributes[name].prompt_words[value] for name, value in zip(ordered_axes, combination)]
            rows.append({"kind": "identity", "prompt": render_prompt(template, occupation, activity, words),
                         "neutral_prompt": neutral_prompt, "occupation": occupation, "activity": activity,
                         **empty_attributes, **dict(zip(ordered_axes, combination))})
    frame = pd.DataFrame(rows, columns=PROMPT_COLUMNS[1:] + attributes.names)
    duplicated = frame["prompt"].duplicated()
    if duplicated.any():
        raise InputError(f"two input rows render to the same prompt: {frame['prompt'][duplicated].iloc[0]!r}")
    frame.insert(0, "prompt_id", frame["prompt"].map(prompt_id))
    return frame


def read_prompt_table(path) -> pd.DataFrame:
    """Read a step-1 prompts CSV (docs/data_formats.md); attribute columns are optional."""
    prompts = read_csv_checked(path, ["prompt_id", "kind", "prompt"])
    for column in ("neutral_prompt", "occupation", "activity", *ATTRIBUTE_COLUMNS):
        if column not in prompts.columns:
            prompts[column] = prompts["prompt"] if column == "neutral_prompt" else ""
    for position, row in enumerate(prompts.itertuples(index=False)):
        where = f"{path}: row {csv_row_number(position)}"
        if row.kind not in PROMPT_KINDS:
            raise InputError(f"{where}: kind {row.kind!r} is not one of {', '.join(PROMPT_KINDS)}")
        if not row.prompt.strip():
            raise InputError(f"{where}: empty prompt")
        if not row.prompt_id or not all(character in "0123456789abcdef" for character in row.prompt_id):
            raise InputError(f"{where}: prompt_id {row.prompt_id!r} must be lowercase hex (step 1 writes it)")
    duplicated = prompts["prompt_id"].duplicated()
    if duplicated.any():
        position = int(duplicated.to_numpy().nonzero()[0][0])
        raise InputError(f"{path}: row {csv_row_number(position)}: duplicate prompt_id {prompts['prompt_id'].iloc[position]}")
    return prompts
