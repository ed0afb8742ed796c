"""Integration: export the real SmolLM2-135M-Instruct at 6:8 with a small self-generated calibration."""
from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")


@pytest.mark.slow
def test_smollm2_export_6_8(smollm2_path, tmp_path):
    from pbs2p import format as fmt
    from pbs2p.exporter import models as M
    from pbs2p.exporter import pipeline as P

    out = tmp_path / "smol.bin"
    cfg = P.ExportConfig(nm=(6, 8), nsamples=8, seqlen=128, progress=False)
    comp, stats = P.export(None, out, cfg)
    r = gguf.GGUFReader(str(out))
    kv = {k: f.contents() for k, f in r.fields.items()}
    assert kv["general.architecture"] == "llama" and kv["llama.block_count"] == 30
    assert kv["tokenizer.ggml.pre"] == "smollm" and len(kv["tokenizer.ggml.tokens"]) == 49152
    ns = list(kv["pbs2p.nm.n"])
    assert len(ns) == 30 and sum(ns) == 6 * 30 and all(5 <= n <= 7 for n in ns)
    # K = 576 (5 column blocks, 9 words) or 1536 (12 blocks, 24 words), T = 1: planes 2.0 bpw + f16 α, μ
    want = {576: (2 * 9 * 8 + 5 * 2 + 5 * 2) * 8 / 576, 1536: (2 * 24 * 8 + 12 * 2 + 12 * 2) * 8 / 1536}
    per_layer = {576: 0, 1536: 0}
    n_w = {576: 0, 1536: 0}
    for rec in comp.records:
        k = rec.shape[1]
        n_w[k] += rec.shape[0] * k
        per_layer[k] += rec.nbytes
    for k in want:
        assert 8 * per_layer[k] / n_w[k] == pytest.approx(want[k])
    expected = 8 * sum(per_layer.values()) / sum(n_w.values())
    assert stats["storage_bpw"] == pytest.approx(expected) and 2.2 < stats["storage_bpw"] < 2.3
    assert stats["param_bits"] == pytest.approx(0.75)
    sb = fmt.read_sb(r, "blk.0.attn_q", 576, 128)
    kept = fmt.unpack_sb(sb)[0] != 0
    assert np.all(kept.reshape(576, -1, 8).sum(-1) == ns[0])
    assert M.default_model_path() == smollm2_path
