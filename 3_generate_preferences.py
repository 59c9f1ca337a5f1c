"""Step 3: pair diverse and base image populations into preference pairs captioned with the neutral prompt
(popalign/preferences/).

    python 3_generate_preferences.py --image_dirs outputs/images/train --classifier deepface
writes outputs/preferences/pairs.csv and its summary; `--help` lists the flags.
"""

import sys

from popalign.preferences.__main__ import build_parser, main  # noqa: F401  (build_parser: the flags, for tools that read them)

if __name__ == "__main__":
    sys.exit(main())
