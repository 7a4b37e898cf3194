"""ARForensics scoring entry point:

    python eval/arforensics.py --model runs/gduf/final --root ARForensics

Same code as ``unigendet eval arforensics ...``.
"""

import sys

from unigendet.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", "arforensics", *sys.argv[1:]]))
