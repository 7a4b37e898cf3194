"""Detector comparison scoring entry point:

    python eval/compare.py --detectors ltd:runs/ltd/final ours=unigendet:runs/gduf/final --benchmark genimage --root GenImage

Same code as ``unigendet eval compare ...``.
"""

import sys

from unigendet.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", "compare", *sys.argv[1:]]))
