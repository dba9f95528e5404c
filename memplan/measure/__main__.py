"""``python -m memplan.measure``: ``memplan measure --device cuda``, launchable on every rank.

    accelerate launch --num_processes 8 -m memplan.measure \\
        --model llama-3.1-8b --method full --zero 3 --out run.json

Each rank measures its own GPU and writes ``run.rank<N>.json``; rank 0 prints the comparison.
"""

from __future__ import annotations

import sys

from memplan.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["measure", "--device", "cuda", *sys.argv[1:]]))
