"""DRCT-2M scoring entry point:

    python eval/drct2m.py --model runs/gduf/final --root DRCT

Same code as ``unigendet eval drct2m ...``.
"""

import sys

from unigendet.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", "drct2m", *sys.argv[1:]]))
