"""DIGA (stage 2) entry point for launchers:

    deepspeed --num_gpus 8 train/diga.py --config configs/train/diga_bagel7b.yaml [key=value ...]

Same code as ``unigendet train --config ...``; the config's ``stage`` must be ``diga``.
"""

import sys

from unigendet.cli import main

if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    if "stage=gduf" in args:
        sys.exit("train/diga.py runs stage 2; use train/gduf.py for GDUF")
    sys.exit(main(["train", *args, "stage=diga"]))
