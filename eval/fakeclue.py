"""FakeClue-protocol scoring entry point:

    python eval/fakeclue.py --model runs/gduf/final --json-path FakeClue/test.json --image-root FakeClue/

Same code as ``unigendet eval fakeclue ...``.
"""

import sys

from unigendet.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", "fakeclue", *sys.argv[1:]]))
