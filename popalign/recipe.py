"""The counts a real run implies, read from the repository: its prompt and attribute files and the shell scripts'
defaults (`: "${NAME:=value}"` lines), so each count has one home and the cost model follows an edit of either."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SHELL_DEFAULT = re.compile(r'^: "\$\{(?P<name>\w+):?=(?P<value>[^}]*)\}"', re.M)


@dataclass(frozen=True)
class Recipe:
    """The counts a run implies. Recipe.from_repository() reads them from the repository's prompt and attribute
    files and the shell scripts' defaults (one home for each)."""

    training_neutral_prompts: int
    identities: int  # gender x race combinations of the attribute file
    images_per_neutral_prompt: int
    images_per_identity_prompt: int
    steps: int
    guidance: bool  # classifier-free guidance: two U-Net passes per step
    train_steps: int
    pairs_per_step: int
    eval_neutral_prompts: int
    eval_identities: int  # identity-specific prompts per evaluation neutral prompt (eval.sh's IDENTITY_RESTRICT applied)
    eval_generic_prompts: int
    eval_images_per_prompt: int
    eval_images_per_identity_prompt: int
    eval_models: int = 2  # the base and one tuned model
    eval_min_images_per_identity_prompt: int = 10  # eval.sh's MIN_IMAGES_PER_IDENTITY_PROMPT: TARGET_INTERVAL_WIDTH's first round
    gradient_checkpointing: bool = False  # 4_train.sh's GRADIENT_CHECKPOINTING: a fourth U-Net forward per trained sample
    validation_steps: int = 100  # 4_train.sh's validation settings (validation is off unless a prompts file is given)
    num_validation_images: int = 16
    num_validation_identity_images: int = 4
    validation_num_inference_steps: int = 25
    validation_guidance: bool = True

    @classmethod
    def from_repository(cls, root: Path = REPO_ROOT, processes: int = 8) -> "Recipe":
        """The original recipe: the repository's data files, the shell scripts' defaults, `processes` GPUs."""
        import pandas as pd

        from popalign.attributes import load_attributes
        from popalign.prompts import parse_restrictions

        attributes = load_attributes(root / "data" / "attributes.json")
        generate, train, evaluate = (shell_defaults((root / name).read_text(encoding="utf-8"))
                                     for name in ("2_generate_images.sh", "4_train.sh", "eval.sh"))
        rows = lambda name: len(pd.read_csv(root / "data" / name, dtype=str, keep_default_na=False))  # noqa: E731
        eval_images_per_prompt = int(evaluate["IMAGES_PER_PROMPT"])
        restricted = parse_restrictions([evaluate["IDENTITY_RESTRICT"]] if evaluate.get("IDENTITY_RESTRICT") else [], attributes)
        eval_identities = 1
        for axis in evaluate["IDENTITY_AXES"].split(","):
            eval_identities *= len(restricted.get(axis, attributes[axis].labels))
        return cls(training_neutral_prompts=rows("training_prompts.csv"),
                   identities=len(attributes["gender"].labels) * len(attributes["race"].labels),
                   images_per_neutral_prompt=int(generate["IMAGES_PER_NEUTRAL_PROMPT"]),
                   images_per_identity_prompt=int(generate["IMAGES_PER_IDENTITY_PROMPT"]),
                   steps=int(generate["STEPS"]), guidance=float(generate["GUIDANCE"]) > 1.0,
                   train_steps=int(train["MAX_TRAIN_STEPS"]), gradient_checkpointing=train["GRADIENT_CHECKPOINTING"] == "on",
                   validation_steps=int(train["VALIDATION_STEPS"]), num_validation_images=int(train["NUM_VALIDATION_IMAGES"]),
                   num_validation_identity_images=int(train["NUM_VALIDATION_IDENTITY_IMAGES"]),
                   validation_num_inference_steps=int(train["VALIDATION_NUM_INFERENCE_STEPS"]),
                   validation_guidance=float(train["VALIDATION_GUIDANCE_SCALE"]) > 1.0,
                   pairs_per_step=int(train["TRAIN_BATCH_SIZE"]) * int(train["GRADIENT_ACCUMULATION_STEPS"]) * processes,
                   eval_neutral_prompts=rows("eval_prompts.csv"), eval_identities=eval_identities, eval_generic_prompts=rows("eval_generic_prompts.csv"),
                   eval_images_per_prompt=eval_images_per_prompt,
                   eval_min_images_per_identity_prompt=int(evaluate["MIN_IMAGES_PER_IDENTITY_PROMPT"]),
                   eval_images_per_identity_prompt=int(evaluate.get("IMAGES_PER_IDENTITY_PROMPT") or eval_images_per_prompt))

    @property
    def training_images(self) -> int:
        identity_prompts = self.training_neutral_prompts * self.identities
        return self.training_neutral_prompts * self.images_per_neutral_prompt + identity_prompts * self.images_per_identity_prompt

    @property
    def evaluation_images(self) -> int:
        per_model = ((self.eval_neutral_prompts + self.eval_generic_prompts) * self.eval_images_per_prompt
                     + self.eval_neutral_prompts * self.eval_identities * self.eval_images_per_identity_prompt)
        return self.eval_models * per_model


def shell_defaults(text: str) -> dict[str, str]:
    """`: "${X:=value}"` lines of a shell script -> {X: value}, for literal values (no variable, no command)."""
    return {match["name"]: match["value"] for match in SHELL_DEFAULT.finditer(text) if "$" not in match["value"]}
