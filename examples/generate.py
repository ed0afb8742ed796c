"""Stream a completion from a pbs2p model file.

    python examples/generate.py model.bin "Once upon a time" --max-tokens 64
"""
import argparse
import sys

from pbs2p import Runtime

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("prompt")
ap.add_argument("--max-tokens", type=int, default=64)
ap.add_argument("--temperature", type=float, default=0.8)
ap.add_argument("--seed", type=int, default=0)
args = ap.parse_args()

with Runtime(args.model, seed=args.seed) as rt:
    print(rt, file=sys.stderr)
    for piece in rt.generate(args.prompt, max_tokens=args.max_tokens, temperature=args.temperature, stream=True):
        print(piece, end="", flush=True)
    print()
