"""Step 4: fine-tune the U-Net on preference pairs. Run under `accelerate launch` (see 4_train.sh).

    accelerate launch train_popalign.py (= accelerate launch -m popalign.training) --pairs_file outputs/preferences/pairs.csv --output_dir runs/popalign

Flags: `python train_popalign.py --help` (popalign/training/config.py holds them with their help).
"""

import sys

from popalign.io import exit_2_on_input_error
from popalign.training.config import build_parser, config_from_args  # noqa: F401  (build_parser: the flags)
from popalign.training.trainer import TrainingDiverged, train


@exit_2_on_input_error
def main(argv=None) -> int:
    try:
        train(config_from_args(argv))
    except TrainingDiverged as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
