r"""Robustness (JPEG / crop) scoring entry point:

    python eval/robustness.py --model runs/gduf/final --json-path FakeClue/data_json/test.json \
        --image-root FakeClue/test --settings none jpeg90 jpeg70 jpeg50 crop0.9 crop0.7 crop0.5

Same code as ``unigendet eval robustness ...``.
"""

import sys

from unigendet.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", "robustness", *sys.argv[1:]]))
