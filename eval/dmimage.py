"""DMimage scoring entry point:

    python eval/dmimage.py --model runs/gduf/final --root DMimage/test

Same code as ``unigendet eval dmimage ...``.
"""

import sys

from unigendet.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", "dmimage", *sys.argv[1:]]))
