"""Block and linear output errors of exported files on any text: the calibration windows or held-out ones.

    python benchmarks/quality/blockerr.py MODEL.gguf FILE.bin [FILE.bin ...] --text wiki --windows 4 \
        --seqlen 2048 --threads 2 --out blockerr.jsonl

The exporter records, per block, the relative output error of the compressed block against the FP block on the
same inputs, and per linear tr(ΔW H ΔWᵀ)/tr(W H Wᵀ), both on its calibration windows. A method can lower those
numbers by fitting the calibration sample better without serving other text better; this script measures the same
two quantities, the same way, on other text. Per file, the blocks run in order as in the exporter: block l's input
is the compressed model's own output of block l − 1 (the file's linears in blocks < l); the FP block runs on it
(accumulating each linear's input Hessian H as the exporter does), then the block with the file's linears
(dequantized: the exact weights the file holds). Everything else (embeddings, norms) is the original model's.

--text wiki: the first --windows non-overlapping --seqlen-token windows of WikiText-2 test (the windows
benchmarks/quality/run.py scores perplexity on); --text c4: the calibration windows run.py and pbs2p-export draw
(--nsamples, --seqlen, --seed; the first --windows of them). With c4 and every calibration window, the numbers
reproduce the export's record (tests/test_blockerr.py: block errors exactly, linear errors to 1e-6). --parts adds
each block's error with only its attention linears (attn_*) from the file and with only its feed-forward ones
(ffn_*), on the same inputs: which half of the block an excess comes from. --parts GROUPS names other groups
(comma-separated; a group is linear-name prefixes joined by +: attn_q+attn_k,attn_v+attn_output). One JSON line per
file and text goes to --out (appended).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data"
TEXTS = {"wiki": DATA / "wikitext-2-raw" / "wiki.test.raw",
         "c4": DATA / "c4" / "c4-train.00000-of-01024.first1000.jsonl"}


def text_windows(kind: str, path: Path, loaded, nsamples: int, seqlen: int, seed: int, n: int | None
                 ) -> tuple[torch.Tensor, str]:
    """-> (windows [n, seqlen] token ids, description)."""
    from pbs2p.exporter import calib
    from pbs2p.exporter import eval as evaluation

    if kind == "c4":
        w, desc = calib.get_windows(str(path), loaded.model, loaded.tokenizer, nsamples, seqlen, seed, False)
    else:
        ids = calib.tokenize_all(loaded.tokenizer, path.read_text(encoding="utf-8"))
        k = evaluation.windows(ids, seqlen, n)
        w, desc = ids[: k * seqlen].reshape(k, seqlen), f"{path.name}, first {k} windows x {seqlen}"
    if n is not None and n < w.shape[0]:
        w, desc = w[:n], f"{desc} (first {n})"
    return w, desc


@torch.no_grad()
def measure(loaded, fpath: Path, windows: torch.Tensor, max_blocks: int | None = None, progress: bool = True,
            parts: list[str] | None = None) -> dict:
    """Per-block and per-linear relative (squared) output errors of fpath's linears, on windows (see the module
    docstring). With parts (groups of linear-name prefixes joined by +, e.g. ["attn_", "ffn_"]), also each
    block's error with only that group's linears from the file, the others original, on the same inputs: where in
    the block the error arises. The loaded model's weights are left as they were."""
    from tqdm.auto import tqdm

    from pbs2p import format as fmt
    from pbs2p.exporter import arch
    from pbs2p.exporter import fakequant
    from pbs2p.exporter import driver
    from pbs2p.exporter import solver

    model = loaded.model
    fam = arch.family_of(model.config)
    dev = next(model.parameters()).device
    _, _, sbs = fakequant.read_file_weights(fmt.ModelFile(fpath))
    layers = arch.blocks(model, fam)
    nb = len(layers) if max_blocks is None else min(max_blocks, len(layers))
    inps, kwargs = driver.capture_block0_inputs(model, fam, windows, dev)
    block_err: list[float] = []
    layer_err: dict[str, float] = {}
    parts_err: dict[str, list[float]] = {p: [] for p in parts or ()}
    for li in tqdm(range(nb), desc=fpath.name, disable=not progress, file=sys.stderr):
        layer = layers[li]
        lins = arch.block_linears(layer, fam)
        fp_out, accs, owner = driver._run_block_hessians(layer, lins, inps, kwargs, dev)
        saved, quant = {}, {}
        for _, g, lin in lins:
            pre = f"blk.{li}.{g}"
            if pre not in sbs:
                raise ValueError(f"{fpath}: {pre} is not a sparse-binary tensor")
            W = lin.weight.data
            w_hat = torch.from_numpy(sbs[pre].dequantize()).to(W.device)
            if w_hat.shape != W.shape:
                raise ValueError(f"{fpath}: {pre} has shape {tuple(w_hat.shape)}, the model {tuple(W.shape)}")
            layer_err[pre] = solver.output_error(W, W - w_hat, accs[owner[g]].H)
            saved[g], quant[g] = W.clone(), w_hat
        del accs

        def err_with(prefixes: tuple[str, ...]) -> tuple[float, torch.Tensor]:
            """The block's error with the file's linears whose names start with one of prefixes (others original)."""
            for _, g, lin in lins:
                lin.weight.data.copy_(quant[g] if g.startswith(prefixes) else saved[g])
            out = driver.run_block(layer, inps, kwargs)
            return driver.block_error(out, fp_out), out

        try:
            e, q_out = err_with(("",))
            block_err.append(e)
            for part in parts_err:
                parts_err[part].append(err_with(tuple(part.split("+")))[0])
        finally:
            for _, g, lin in lins:
                lin.weight.data.copy_(saved[g])
        inps = q_out
    r = {"block_err": block_err, "layer_out_err": layer_err,
         "mean_layer_out_err": sum(layer_err.values()) / len(layer_err)}
    r.update({f"block_err_{p.rstrip('_')}": v for p, v in parts_err.items()})
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="the original model (.gguf file or HF folder) the files were exported from")
    ap.add_argument("files", nargs="+", help="pbs2p files")
    ap.add_argument("--text", default="wiki", help="wiki, c4 or a text file (read as WikiText is)")
    ap.add_argument("--windows", type=int, default=None, help="how many windows (default: all calibration ones; "
                    "for text, every window)")
    ap.add_argument("--nsamples", type=int, default=16, help="with --text c4: the export's --nsamples")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0, help="with --text c4: the export's --seed")
    ap.add_argument("--blocks", type=int, default=None, help="only the first BLOCKS blocks")
    ap.add_argument("--parts", nargs="?", const="attn_,ffn_", default=None,
                    help="also each block's error with only these groups of linears from the file (default groups "
                    "attn_,ffn_: attention, feed-forward; one more block pass per group and block)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="JSON-lines file (appended)")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args()
    kind = a.text if a.text in TEXTS else "file"
    path = TEXTS.get(a.text, Path(a.text))
    if not path.is_file():
        if kind == "file":
            print(f"blockerr: error: {path}: no such text file", file=sys.stderr)
            return 1
        print(f"skipped: {path} is missing (the benchmark needs ../shared/data beside the repository)")
        return 0
    for f in a.files:
        if not Path(f).is_file():
            print(f"blockerr: error: {f}: no such file", file=sys.stderr)
            return 1
    if a.threads:
        torch.set_num_threads(a.threads)

    from pbs2p.exporter import models
    from pbs2p.exporter import driver

    t = time.time()
    loaded = models.load(a.model)
    driver.set_determinism(a.seed)
    windows, desc = text_windows(kind, path, loaded, a.nsamples, a.seqlen, a.seed, a.windows)
    print(f"loaded {a.model} in {time.time() - t:.0f} s; text: {desc}", flush=True)
    for f in a.files:
        t0 = time.time()
        r = measure(loaded, Path(f), windows, a.blocks, not a.quiet, a.parts.split(",") if a.parts else None)
        rec = {"file": Path(f).name, "model": Path(a.model).name, "text": desc, "tokens": int(windows.numel()),
               "blocks": len(r["block_err"]), "mean_layer_out_err": round(r["mean_layer_out_err"], 5),
               "mean_block_err": round(sum(r["block_err"]) / len(r["block_err"]), 5),
               "block_err": [round(e, 5) for e in r["block_err"]],
               **{k: [round(e, 5) for e in v] for k, v in r.items() if k.startswith("block_err_")},
               "layer_out_err": {k: round(v, 5) for k, v in r["layer_out_err"].items()},
               "seconds": round(time.time() - t0, 1)}
        if a.out:
            with open(a.out, "a") as fh:
                fh.write(json.dumps(rec) + "\n")
        print(json.dumps({k: v for k, v in rec.items() if k != "layer_out_err"}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
