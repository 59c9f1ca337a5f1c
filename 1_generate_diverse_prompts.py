"""Step 1: neutral prompts -> identity-specific variants for every attribute combination (popalign/prompts/).

    python 1_generate_diverse_prompts.py --axes gender,race
writes outputs/prompts/training_prompts_diverse.csv; `--help` lists the flags.
"""

import sys

from popalign.prompts.__main__ import build_parser, main  # noqa: F401  (build_parser: the flags, for tools that read them)

if __name__ == "__main__":
    sys.exit(main())
