"""Step 4: fine-tune on preference pairs under `accelerate launch` (4_train.sh; popalign/training/).

    accelerate launch train_popalign.py --pairs_file outputs/preferences/pairs.csv --output_dir runs/popalign

Flags: `python train_popalign.py --help` (popalign/training/config.py holds them with their help).
"""

import sys

from popalign.training.__main__ import build_parser, main  # noqa: F401  (build_parser: the flags, for tools that read them)

if __name__ == "__main__":
    sys.exit(main())
