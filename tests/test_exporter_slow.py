"""Integration: export the real SmolLM2-135M-Instruct at 6:8 with a small self-generated calibration."""
from __future__ import annotations

import numpy as np
import pytest

import gguf


@pytest.fixture(scope="module")
def smol_export(smollm2_path, tmp_path_factory):
    """One PBS²P 6:8 export of the real SmolLM2 (small self-generated calibration) shared by this module, with the
    coarse stage on (not the default) so that per-block N is exercised on a real model, through the runtime too."""
    from pbs2p.exporter import config, driver

    out = tmp_path_factory.mktemp("smol") / "smol.bin"
    cfg = config.QuantConfig(nm=(6, 8), coarse=True, nsamples=8, seqlen=128, progress=False)
    comp, stats = driver.export(None, out, cfg)
    return out, comp, stats


@pytest.mark.slow
def test_smollm2_export_6_8(smol_export, smollm2_path):
    from pbs2p import format as fmt
    from pbs2p.exporter import models

    out, comp, stats = smol_export
    r = gguf.GGUFReader(str(out))
    kv = {k: f.contents() for k, f in r.fields.items()}
    a = fmt.arch_name("llama")
    assert kv["general.architecture"] == a and kv[f"{a}.block_count"] == 30
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
    sb = fmt.ModelFile(out).sb("blk.0.attn_q")
    assert (sb.n_out, sb.n_in, sb.block_size) == (576, 576, 128)
    kept = fmt.unpack_sb(sb)[0] != 0
    assert np.all(kept.reshape(576, -1, 8).sum(-1) == ns[0])
    assert models.default_model_path() == smollm2_path


@pytest.fixture(scope="module")
def smol_fp16(smollm2_path, tmp_path_factory):
    """SmolLM2 with dense F16 linears (no quantization, no calibration; Q8_0 embeddings/head as always)."""
    from pbs2p.exporter import config, driver

    out = tmp_path_factory.mktemp("smol-fp16") / "smol-fp16.bin"
    driver.export(None, out, config.QuantConfig(method="fp16", progress=False))
    return out


def _ppl_and_greedy(path, text, seqlen=512, n_win=2, n_gen=40):
    """C and PyTorch fake-quant perplexity on the same windows, and the number of greedy steps on which they
    agree: PyTorch decodes greedily; the C runtime scores that sequence once (teacher forcing) and the first
    position where its argmax differs ends the agreement (before it, the two greedy decodes are identical)."""
    import torch

    from pbs2p import Runtime
    from pbs2p.exporter import eval as evaluation
    from pbs2p.exporter import fakequant

    ref = fakequant.load_fakequant(path, act_quant=True)
    prompt = "The capital of France is"
    with Runtime(path, threads=2, context_length=seqlen) as rt:
        ids = rt.tokenize(text, add_bos=False)
        ppl_c = rt.perplexity(text, seqlen=seqlen, max_windows=n_win, progress=False)
        p_ids = rt.tokenize(prompt, add_bos=False)
        text_c = rt.generate(prompt, max_tokens=n_gen, temperature=0)
        with torch.no_grad():
            x = torch.tensor([p_ids])
            for _ in range(n_gen):
                x = torch.cat([x, ref(x).logits[:, -1:].argmax(-1)], dim=1)
        seq = x[0].tolist()
        pred_c = rt.logits(seq).argmax(-1)[len(p_ids) - 1:-1]
        gen_t = seq[len(p_ids):]
        agree = next((i for i, (a, b) in enumerate(zip(pred_c, gen_t)) if a != b), n_gen)
        agreed_text = rt.detokenize(gen_t[:agree])
    ppl_t, n_tok, _ = evaluation.perplexity(ref, torch.tensor(ids), seqlen, n_win, progress=False)
    assert n_tok == n_win * (seqlen - 1)
    # generate() decodes the same way: its text starts with the agreed part (or is a prefix of it at an EOS)
    assert text_c.startswith(agreed_text) or agreed_text.startswith(text_c), (text_c, agreed_text)
    return ppl_c, ppl_t, agree


@pytest.mark.slow
def test_smollm2_runtime_matches_pytorch(smol_fp16):
    """The real model through the whole chain (tokenizer, RoPE θ = 1e5, GQA 9/3, tied Q8_0 head, F16 linears):
    the C runtime's WikiText-2 perplexity is within 0.5% of the PyTorch fake-quant model's on the same windows,
    and greedy text agrees for >= 32 tokens.

    Why the 6:8 file is not held to this bound: 1-bit SmolLM2 is numerically chaotic (hidden states ~2.5e3); a
    1e-6 relative perturbation of the embeddings moves PyTorch's own logits by 2-15 (of ~30), so no two
    implementations agree to 0.5% on it (measured: C 4.1e6 vs PyTorch 6.7e6 perplexity, both ~15 nats/token)."""
    from conftest import WIKITEXT, optional_data

    optional_data(WIKITEXT)
    ppl_c, ppl_t, agree = _ppl_and_greedy(smol_fp16, WIKITEXT.read_text(encoding="utf-8")[:60000])
    assert ppl_t < 100, ppl_t  # a working model, not a broken one
    assert abs(ppl_c - ppl_t) / ppl_t < 0.005, (ppl_c, ppl_t)
    assert agree >= 32, agree
