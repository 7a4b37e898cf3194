"""GenEval: generate 4 images per prompt, then summarise an official results.jsonl (or score approximately):

    python eval/geneval.py --stage generate --model runs/gduf/final --gen-dir runs/geneval/images \
        --metadata-file geneval/prompts/evaluation_metadata.jsonl --prompt-set short
    python eval/geneval.py --stage summarise --model runs/gduf/final --gen-dir runs/geneval/images \
        --results runs/geneval/results.jsonl

Same code as ``unigendet eval geneval ...``.
"""

import sys

from unigendet.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", "geneval", *sys.argv[1:]]))
