"""Intra-prompt diversity (LPIPS, CLIP similarity) over 16 samples of 500 held-out prompts:

    python eval/diversity.py --model runs/gduf/final --data-files laion/final_metadata.json \
        --gen-dir runs/diversity/images --lpips-alexnet weights/alexnet-owt-7be5be79.pth \
        --lpips-lin weights/alex.pth --clip-dir weights/clip-vit-large-patch14

Same code as ``unigendet eval diversity ...``.
"""

import sys

from unigendet.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", "diversity", *sys.argv[1:]]))
