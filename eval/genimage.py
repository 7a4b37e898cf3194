"""GenImage scoring entry point:

    python eval/genimage.py --model runs/gduf/final --root GenImage

Same code as ``unigendet eval genimage ...``.
"""

import sys

from unigendet.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", "genimage", *sys.argv[1:]]))
