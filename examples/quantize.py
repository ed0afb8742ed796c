"""Compress a causal LM with the Python export API and print what each layer cost.

    python examples/quantize.py MODEL OUT.bin [--nm 6:8] [--method pbs2p] [--calib self|FILE.txt|FILE.jsonl]

MODEL: an HF folder, a .gguf file or a hub id (needs the export extra: pip install "pbs2p[export]").
"""
import argparse

import pbs2p

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("out")
ap.add_argument("--method", default="pbs2p")
ap.add_argument("--nm", default="6:8")
ap.add_argument("--calib", default="self")
ap.add_argument("--nsamples", type=int, default=32)
ap.add_argument("--seqlen", type=int, default=512)
args = ap.parse_args()

config = pbs2p.QuantConfig(method=args.method, nm=args.nm, nsamples=args.nsamples, seqlen=args.seqlen,
                           progress=False)
result = pbs2p.quantize(args.model, config, calib=args.calib)
for r in result.records:
    print(f"blk.{r.block}.{r.name:<12} {r.n}:{r.m}  output error {r.err_out:.4f}  {8 * r.nbytes / (r.shape[0] * r.shape[1]):.3f} bpw")
stats = result.save(args.out)
print(f"{args.out}: {stats['file_bytes']:,} bytes, linears {stats['storage_bpw']:.3f} storage bits per weight")
