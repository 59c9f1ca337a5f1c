"""Identity attributes (gender, race, age): their labels, prompt words and classifier mappings."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from popalign.io import InputError

DEFAULT_ATTRIBUTES_PATH = Path(__file__).resolve().parent.parent / "data" / "attributes.json"


@dataclass(frozen=True)
class Attribute:
    """One identity axis. `labels` is the fixed class list used by prompts, classifiers and metrics."""

    name: str
    prompt_words: dict[str, str]
    classifier_labels: dict[str, str] = field(default_factory=dict)
    # label -> [from, to) in years, for an attribute a classifier estimates as a number of years (age); to may be inf.
    years: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def labels(self) -> list[str]:
        return list(self.prompt_words)

    def map_classifier_label(self, raw_label: str) -> str:
        """Map a classifier's raw label (e.g. DeepFace's 'Man') to this attribute's label ('male')."""
        if raw_label in self.classifier_labels:
            return self.classifier_labels[raw_label]
        if raw_label in self.prompt_words:
            return raw_label
        raise ValueError(f"classifier label {raw_label!r} is not a {self.name} label ({', '.join(self.labels)})")

    def label_of_years(self, years: float) -> str:
        """The label whose range [from, to) holds `years` (the attribute's 'years' ranges)."""
        for label, (low, high) in self.years.items():
            if low <= years < high:
                return label
        raise ValueError(f"{years} years is outside the {self.name} ranges {self.years}")


@dataclass(frozen=True)
class AttributeSet:
    attributes: dict[str, Attribute]
    word_order: list[str]

    def __getitem__(self, name: str) -> Attribute:
        if name not in self.attributes:
            raise KeyError(f"unknown attribute {name!r} (known: {', '.join(self.attributes)})")
        return self.attributes[name]

    @property
    def names(self) -> list[str]:
        return list(self.attributes)


def load_attributes(path: str | Path = DEFAULT_ATTRIBUTES_PATH) -> AttributeSet:
    """Load the attribute definition file (see docs/data_formats.md)."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except json.JSONDecodeError as error:
        raise InputError(f"{path}: invalid JSON ({error})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("attributes"), dict) or not raw["attributes"]:
        raise InputError(f"{path}: expected an object with a non-empty 'attributes' object (docs/data_formats.md)")
    attributes = {}
    for name, spec in raw["attributes"].items():
        if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
            raise InputError(f"{path}: attribute name {name!r}: use lowercase letters, digits and _ (it names columns, "
                             "metrics and flags)")
        if not isinstance(spec, dict):
            raise InputError(f"{path}: attribute {name!r} must be an object with 'values'")
        values = spec.get("values")
        if not isinstance(values, dict) or not values:
            raise InputError(f"{path}: attribute {name!r} needs a non-empty 'values' mapping")
        if not isinstance(spec.get("classifier_labels", {}), dict):
            raise InputError(f"{path}: attribute {name!r}: 'classifier_labels' must map raw labels to labels")
        attributes[name] = Attribute(name, dict(values), dict(spec.get("classifier_labels", {})),
                                     _year_ranges(path, name, spec.get("years"), list(values)))
    if not isinstance(raw.get("word_order", []), list):
        raise InputError(f"{path}: 'word_order' must be a list of attribute names")
    word_order = list(raw.get("word_order", attributes))
    unknown = [name for name in word_order if name not in attributes]
    if unknown:
        raise InputError(f"{path}: word_order names unknown attribute(s) {', '.join(unknown)}")
    word_order += [name for name in attributes if name not in word_order]
    return AttributeSet(attributes, word_order)


def _year_ranges(path: Path, name: str, years, labels: list[str]) -> dict[str, tuple[float, float]]:
    """'years': {label: [from, to)} for every label, in label order, each range starting where the one before ends,
    the first at 0; the last `to` may be null (no upper end)."""
    if years is None:
        return {}
    where = f"{path}: attribute {name!r}: 'years'"
    if not isinstance(years, dict) or list(years) != labels:
        raise InputError(f"{where} must give a [from, to) range for each label, in the order of 'values' ({', '.join(labels)})")
    ranges, expected_start = {}, 0.0
    for index, (label, bounds) in enumerate(years.items()):
        last = index == len(years) - 1
        numbers_ok = isinstance(bounds, list) and len(bounds) == 2 and all(
            isinstance(value, (int, float)) and not isinstance(value, bool) for value in bounds if value is not None)
        if not numbers_ok or bounds[0] is None or (bounds[1] is None and not last):
            raise InputError(f"{where}: {label!r} must be [from, to] in years (only the last 'to' may be null), got {bounds!r}")
        low, high = float(bounds[0]), math.inf if bounds[1] is None else float(bounds[1])
        if low != expected_start or not high > low:
            raise InputError(f"{where}: {label!r} is [{bounds[0]}, {bounds[1]}): ranges must start at 0, rise, and each "
                             f"start where the one before ends ({expected_start:g})")
        ranges[label], expected_start = (low, high), high
    return ranges
