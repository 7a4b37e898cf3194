"""GDUF (stage 1) entry point for launchers:

    deepspeed --num_gpus 8 train/gduf.py --config configs/train/gduf_bagel7b.yaml [key=value ...]

Same code as ``unigendet train --config ...`` with ``stage=gduf``.
"""

from unigendet.cli import stage_main
from unigendet.distributed import exit_process

if __name__ == "__main__":
    exit_process(stage_main("gduf"))
