"""Per-block checkpoints of an export, so that `pbs2p-export --resume` continues an interrupted run and writes
the same bytes as an uninterrupted one.

A checkpoint is a folder (by default `OUT.ckpt` beside the output file):

    meta.json        version, fingerprint, calibration description, N per block, blocks done, their layer
                     records and block errors
    windows.npy      the calibration windows (int64), so a resumed run does not sample or read them again
    blk-NNNN.npz     the packed linears of block NNNN (planes, alpha, mu and the N:M code's (N, M) per layer: what the file holds)
    inputs.pt        the next block's inputs (the compressed model's hidden states on the calibration windows)

Every file is written to a temporary name and renamed, and meta.json is renamed last, after the block file and
the inputs it counts; so an interrupt at any moment leaves the previous consistent checkpoint. The fingerprint
(hash of the export settings, the model's weights and the calibration windows) keeps --resume from mixing two
different exports. The checkpoint is removed once the output file is written.

Why this is exact: everything after block k depends only on the compressed weights of blocks <= k (stored
bit for bit; the fake-quant weights are their dequantization, which equals the solver's output by the
driver's own check), the inputs of block k+1 (stored as float32), the settings and the windows.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pbs2p import format as fmt

VERSION = 2  # 2: a linear's .shape adds the N:M code's (N, M)
# settings that do not change the file's bytes, so a resume may differ in them
_NEUTRAL = {"progress", "device", "checkpoint", "measurements"}  # what does not change the bytes


class CheckpointError(ValueError):
    """The checkpoint folder is missing, from another export, or damaged (the message says which)."""


def fingerprint(cfg: Any, model: Any, windows: torch.Tensor | None, neutral: frozenset[str] | set[str] = frozenset()
                ) -> str:
    """sha256 over cfg's fields (less the neutral ones and `neutral`), the model's tensors and the windows."""
    h = hashlib.sha256()
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NEUTRAL and k not in neutral}
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy())  # buffer protocol: no copy
    if windows is not None:
        h.update(windows.to(torch.int64).contiguous().numpy())
    return h.hexdigest()


def atomic_write(path: Path, write) -> None:
    """write(file object) into path.tmp, then rename over path."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


class Checkpoint:
    def __init__(self, folder: str | Path, fp: str = "") -> None:
        self.folder = Path(folder)
        self.meta: dict[str, Any] = {}
        self.fp = fp  # the fingerprint of the export writing it (fingerprint()); "" for one opened to resume

    # ---- writing ----------------------------------------------------------------------------------------------
    def start(self, windows: torch.Tensor | None, calibration: str, nm_n: list[int], n_blocks: int,
              plan: str | None = None) -> None:
        """Begin a fresh checkpoint (replacing any old one), stamped with self.fp."""
        if self.folder.exists():
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True)
        if windows is not None:
            atomic_write(self.folder / "windows.npy", lambda f: np.save(f, windows.to(torch.int64).numpy()))
        self.meta = {"version": VERSION, "fingerprint": self.fp, "calibration": calibration, "nm_n": list(nm_n),
                     "n_blocks": n_blocks, "done": 0, "records": [], "block_err": [], "plan": plan}
        self._write_meta()

    def _write_meta(self) -> None:
        atomic_write(self.folder / "meta.json",
                     lambda f: f.write(json.dumps(self.meta, indent=1, default=float).encode()))

    def save_block(self, li: int, linears: dict[str, Any], records: list[dict], block_err: float,
                   next_inputs: torch.Tensor) -> None:
        if li != self.meta["done"]:
            raise RuntimeError(f"checkpoint: block {li} saved out of order (done {self.meta['done']})")
        arrays: dict[str, np.ndarray] = {}
        for g, sb in linears.items():
            if isinstance(sb, fmt.QLinear):
                arrays[f"{g}.qdata"] = sb.data
                arrays[f"{g}.qshape"] = np.array([sb.n_out, sb.n_in, int(sb.gtype)], dtype=np.int64)
                continue
            arrays[f"{g}.planes"] = sb.planes
            arrays[f"{g}.alpha"] = sb.alpha
            arrays[f"{g}.mu"] = sb.mu
            arrays[f"{g}.shape"] = np.array([sb.n_out, sb.n_in, sb.block_size, *(sb.nm or (0, 0))], dtype=np.int64)
        atomic_write(self.folder / f"blk-{li:04d}.npz", lambda f: np.savez(f, **arrays))
        atomic_write(self.folder / "inputs.pt", lambda f: torch.save(next_inputs.detach().cpu(), f))
        self.meta["done"] = li + 1
        self.meta["records"].extend(records)
        self.meta["block_err"].append(float(block_err))
        self._write_meta()

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    # ---- reading ----------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, folder: str | Path) -> "Checkpoint":
        ck = cls(folder)
        mp = ck.folder / "meta.json"
        if not mp.is_file():
            raise CheckpointError(f"--resume: no checkpoint in {ck.folder} (nothing to resume)")
        try:
            ck.meta = json.loads(mp.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"--resume: {mp} is unreadable ({e})") from e
        if not isinstance(ck.meta, dict) or ck.meta.get("version") != VERSION:
            raise CheckpointError(f"--resume: {mp}: not a version {VERSION} pbs2p checkpoint")
        for k in ("fingerprint", "calibration", "nm_n", "n_blocks", "done", "records", "block_err"):
            if k not in ck.meta:
                raise CheckpointError(f"--resume: {mp}: missing {k!r}")
        return ck

    def windows(self) -> torch.Tensor | None:
        p = self.folder / "windows.npy"
        if not p.is_file():
            return None
        try:
            return torch.from_numpy(np.load(p, allow_pickle=False))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"--resume: {p} is damaged ({e})") from e

    def check(self, fp: str, n_blocks: int) -> None:
        if self.meta["fingerprint"] != fp:
            raise CheckpointError(f"--resume: the checkpoint in {self.folder} is from a different export (model, "
                                  "settings or calibration differ); delete it or rerun with the same arguments")
        if self.meta["n_blocks"] != n_blocks or not 0 <= self.meta["done"] <= n_blocks:
            raise CheckpointError(f"--resume: {self.folder}/meta.json does not match the model's {n_blocks} blocks")

    def load_block(self, li: int) -> dict[str, Any]:
        p = self.folder / f"blk-{li:04d}.npz"
        try:
            out = {}
            with np.load(p, allow_pickle=False) as z:
                for key in z.files:
                    if key.endswith(".shape"):
                        g = key[: -len(".shape")]
                        r, k, bs, n, m = (int(x) for x in z[key])  # n = m = 0: stored as planes
                        sb = fmt.SbLinear(r, k, bs, z[f"{g}.planes"], z[f"{g}.alpha"], z[f"{g}.mu"],
                                          (n, m) if m else None)
                        sb.validate()
                        out[g] = sb
                    elif key.endswith(".qshape"):
                        g = key[: -len(".qshape")]
                        r, k, t = (int(x) for x in z[key])
                        ql = fmt.QLinear(fmt.QType(t), r, k, z[f"{g}.qdata"])
                        ql.validate()
                        out[g] = ql
            return out
        except Exception as e:  # noqa: BLE001 - a bad zip, a missing array, a wrong shape: one clear message
            raise CheckpointError(f"--resume: {p} is missing or damaged ({e})") from e

    def inputs(self) -> torch.Tensor:
        p = self.folder / "inputs.pt"
        try:
            return torch.load(p, weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file is one clear message
            raise CheckpointError(f"--resume: {p} is missing or damaged ({e})") from e
