"""DIGA (stage 2) entry point for launchers:

    deepspeed --num_gpus 8 train/diga.py --config configs/train/diga_bagel7b.yaml [key=value ...]

Same code as ``unigendet train --config ...`` with ``stage=diga``.
"""

from unigendet.cli import stage_main
from unigendet.distributed import exit_process

if __name__ == "__main__":
    exit_process(stage_main("diga"))
