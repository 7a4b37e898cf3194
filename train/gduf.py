"""GDUF (stage 1) entry point for launchers:

    deepspeed --num_gpus 8 train/gduf.py --config configs/train/gduf_bagel7b.yaml [key=value ...]

Same code as ``unigendet train --config ...``; the config's ``stage`` must be ``gduf``.
"""

import sys

from unigendet.cli import main

if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    if "stage=diga" in args:
        sys.exit("train/gduf.py runs stage 1; use train/diga.py for DIGA")
    sys.exit(main(["train", *args, "stage=gduf"]))
