"""UniversalFakeDetect / ForenSynths scoring entry point:

    python eval/ufd.py --model runs/gduf/final --root UniversalFakeDetect

Same code as ``unigendet eval ufd ...``.
"""

import sys

from unigendet.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", "ufd", *sys.argv[1:]]))
