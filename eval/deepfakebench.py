"""DeepfakeBench face-frame scoring entry point:

    python eval/deepfakebench.py --model runs/gduf/final --root datasets/rgb --json-path dataset_json/

Same code as ``unigendet eval deepfakebench ...``.
"""

import sys

from unigendet.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", "deepfakebench", *sys.argv[1:]]))
