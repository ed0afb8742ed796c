"""benchmarks/quality/blockerr.py measures on any windows what the exporter records on its calibration windows: on
those same windows, a file's block and linear output errors equal the export's record."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from conftest import FAMILIES

from pbs2p import format as fmt  # noqa: E402
from pbs2p.exporter import arch  # noqa: E402
from pbs2p.exporter import calib  # noqa: E402
from pbs2p.exporter import fakequant  # noqa: E402
from pbs2p.exporter import models  # noqa: E402
from pbs2p.exporter import config, driver  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "quality" / "blockerr.py"


def _blockerr():
    spec = importlib.util.spec_from_file_location("blockerr", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["pbs2p", "billm"])
def test_blockerr_reproduces_export_record(tiny_model_factory, tmp_path, family, method):
    folder = tiny_model_factory(family)
    cfg = config.QuantConfig(method=method, nm=(6, 8), nsamples=3, seqlen=32, seed=0, progress=False)
    out = tmp_path / "m.bin"
    comp, _ = driver.export(models.load(str(folder)), out, cfg)
    fresh = models.load(str(folder))
    before = {k: v.clone() for k, v in fresh.model.state_dict().items()}
    driver.set_determinism(0)
    windows, _ = calib.get_windows(cfg.calib, fresh.model, fresh.tokenizer, 3, 32, 0, False)
    r = _blockerr().measure(fresh, out, windows, progress=False)
    assert r["block_err"] == comp.block_err
    assert len(r["layer_out_err"]) == len(comp.records)
    for rec in comp.records:
        assert r["layer_out_err"][f"blk.{rec.block}.{rec.name}"] == pytest.approx(rec.err_out, rel=1e-6, abs=1e-12)
    # the model is left as it was: the file's weights go in per block and come out again
    after = fresh.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # the attention-only and feed-forward-only block errors come on top, leaving the rest as it was
    attn = "+".join(g for _, g in arch.FAMILY_BY_NAME["llama"].linears if g.startswith("attn_"))
    rp = _blockerr().measure(fresh, out, windows, progress=False, parts=["attn_", "ffn_", attn])
    assert rp["block_err"] == r["block_err"] and rp["layer_out_err"] == r["layer_out_err"]
    for part in ("attn", "ffn"):
        assert len(rp[f"block_err_{part}"]) == len(r["block_err"]) and all(e > 0 for e in rp[f"block_err_{part}"])
    assert rp[f"block_err_{attn}"] == rp["block_err_attn"]  # the four attention linears named one by one
    assert all(torch.equal(before[k], v) for k, v in fresh.model.state_dict().items())
    assert rp["block_err_attn"][0] == _attn_only_block0_err(folder, out, windows)
    # other windows give other numbers (the measurement depends on the text it is given)
    g = torch.Generator().manual_seed(1)
    other = torch.randint(0, fresh.model.config.vocab_size, windows.shape, generator=g)
    r2 = _blockerr().measure(fresh, out, other, progress=False)
    assert r2["block_err"] != r["block_err"]


@torch.no_grad()
def _attn_only_block0_err(folder: Path, out: Path, windows: torch.Tensor) -> float:
    """Block 0's error with the file's attention linears, built by hand on a fresh copy of the model."""
    m2 = models.load(str(folder)).model
    fam = arch.family_of(m2.config)
    block0 = arch.blocks(m2, fam)[0]
    inps, kwargs = driver.capture_block0_inputs(m2, fam, windows, torch.device("cpu"))
    fp_out = driver.run_block(block0, inps, kwargs)
    _, _, sbs = fakequant.read_file_weights(fmt.ModelFile(out))
    for _, g, lin in arch.block_linears(block0, fam):
        if g.startswith("attn_"):
            lin.weight.data.copy_(torch.from_numpy(sbs[f"blk.0.{g}"].dequantize()))
    q_out = driver.run_block(block0, inps, kwargs)
    return driver.block_error(q_out, fp_out)
