"""FID on held-out prompts (generate, then score against the paired real images):

    python eval/fid.py --model runs/gduf/final --data-files laion/final_metadata.json --gen-dir runs/fid/images \
        --inception-weights weights/pt_inception-2015-12-05-6726825d.pth

Same code as ``unigendet eval fid ...`` (``--stage generate`` per shard, then ``--stage score``).
"""

import sys

from unigendet.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", "fid", *sys.argv[1:]]))
