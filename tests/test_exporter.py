"""Exporter end to end on tiny seeded models of every family: file contents, N:M structure, exactness of the
fake-quant reference against the file, determinism, the coarse allocation, tokenizer metadata."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import FAMILIES

import gguf

from pbs2p import format as fmt  # noqa: E402
from pbs2p.exporter import arch  # noqa: E402
from pbs2p.exporter import coarse  # noqa: E402
from pbs2p.exporter import fakequant  # noqa: E402
from pbs2p.exporter import models  # noqa: E402
from pbs2p.exporter import config, driver  # noqa: E402
from pbs2p.exporter import tokmeta  # noqa: E402

REQUIRED_KEYS = ("general.architecture", "general.alignment", "pbs2p.format_version", "pbs2p.method", "pbs2p.nm.m",
                 "pbs2p.nm.n", "pbs2p.block_size", "pbs2p.calibration", "tokenizer.ggml.model",
                 "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.pre")
ARCH_KEYS = ("context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count",
             "attention.head_count_kv", "vocab_size")


def small_cfg(**kw) -> config.QuantConfig:
    base = dict(nsamples=3, seqlen=32, progress=False, seed=0)
    base.update(kw)
    return config.QuantConfig(**base)


def do_export(folder, out, **kw):
    loaded = models.load(str(folder))
    comp, stats = driver.export(loaded, out, small_cfg(**kw))
    return comp, stats


def fields(path):
    r = gguf.GGUFReader(str(path))
    return r, {k: f.contents() for k, f in r.fields.items()}


_cache: dict = {}


@pytest.fixture(params=[(f, nm) for f in FAMILIES for nm in ("6:8", "dense")], ids=lambda p: f"{p[0]}-{p[1]}")
def exported(request, tiny_model_factory, tmp_path_factory):
    fam, nm = request.param
    if request.param not in _cache:
        out = tmp_path_factory.mktemp("exp") / f"{fam}.bin"
        comp, stats = do_export(tiny_model_factory(fam), out, nm=config.parse_nm(nm))
        _cache[request.param] = (fam, nm, out, comp, stats)
    return _cache[request.param]


def test_metadata(exported):
    fam, nm, out, comp, stats = exported
    _, kv = fields(out)
    for k in REQUIRED_KEYS:
        assert k in kv, k
    a = kv["general.architecture"]
    assert a == fmt.arch_name(fam) == f"pbs2p-{fam}"
    for k in ARCH_KEYS:
        assert f"{a}.{k}" in kv, k
    assert kv["pbs2p.format_version"] == fmt.BASE_FORMAT_VERSION  # planes only
    assert kv["pbs2p.method"] == "pbs2p"
    assert len(kv["pbs2p.nm.n"]) == kv[f"{a}.block_count"]
    if nm == "dense":
        assert kv["pbs2p.nm.m"] == 0
    else:
        assert kv["pbs2p.nm.m"] == 8
        assert list(kv["pbs2p.nm.n"]) == [6] * kv[f"{a}.block_count"]  # the default: uniform N (no coarse stage)
    if fam == "opt":
        assert kv["pbs2p.pos_offset"] == 2 and f"{a}.attention.layer_norm_epsilon" in kv
    else:
        assert f"{a}.rope.freq_base" in kv and f"{a}.attention.layer_norm_rms_epsilon" in kv
    assert len(kv["tokenizer.ggml.tokens"]) == kv[f"{a}.vocab_size"]
    assert "self-generated" in kv["pbs2p.calibration"]


def test_nm_structure_and_exact_weights(exported):
    fam, nm, out, comp, stats = exported
    r, kv = fields(out)
    a = kv["general.architecture"]
    ns = kv["pbs2p.nm.n"]
    model_lin = {}
    for li, layer in enumerate(arch.blocks(comp.model, comp.family)):
        for _, g, lin in arch.block_linears(layer, comp.family):
            model_lin[f"blk.{li}.{g}"] = lin.weight.detach().cpu().numpy()
    n_checked = 0
    mf = fmt.ModelFile(out)
    for pre, w in model_lin.items():
        sb = mf.sb(pre)
        assert (sb.n_out, sb.n_in) == w.shape
        terms = fmt.unpack_sb(sb)
        kept = terms[0] != 0
        deq = fmt.dequantize_sb(sb)
        assert np.array_equal(deq, w), pre  # dequantize(file) == the export's fake-quant weights, bit for bit
        assert np.all(deq[~kept] == 0)
        li = int(pre.split(".")[1])
        per_group = kept.reshape(kept.shape[0], -1, 8).sum(-1)
        want = 8 if nm == "dense" else ns[li]
        assert np.all(per_group == want), (pre, np.unique(per_group))
        n_checked += 1
    assert n_checked == len(comp.family.linears) * kv[f"{a}.block_count"]
    want_bits = 1.0 if nm == "dense" else sum(ns) / (8 * len(ns))
    assert stats["param_bits"] == pytest.approx(want_bits, abs=1e-9)


def test_fakequant_from_file_matches_export(exported):
    fam, nm, out, comp, stats = exported
    fq = fakequant.load_fakequant(out)
    a = dict(comp.model.named_parameters())
    b = dict(fq.named_parameters())
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ids = torch.arange(1, 25)[None]
    with torch.no_grad():
        assert torch.equal(comp.model(ids).logits, fq(ids).logits)


def test_biases_and_tying(tiny_model_factory, tmp_path):
    comp, _ = do_export(tiny_model_factory("qwen2"), tmp_path / "q.bin", nm=None)
    r, kv = fields(tmp_path / "q.bin")
    names = {t.name for t in r.tensors}
    assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"} <= names
    assert "blk.0.attn_output.bias" not in names
    assert "output.weight" not in names  # tied
    comp, _ = do_export(tiny_model_factory("llama"), tmp_path / "l.bin", nm=None)
    names = {t.name for t in gguf.GGUFReader(str(tmp_path / "l.bin")).tensors}
    assert "output.weight" in names and not any(n.endswith(".bias") for n in names)
    comp, _ = do_export(tiny_model_factory("opt"), tmp_path / "o.bin", nm=None)
    names = {t.name for t in gguf.GGUFReader(str(tmp_path / "o.bin")).tensors}
    assert {"position_embd.weight", "output_norm.bias", "blk.1.ffn_up.bias", "blk.1.attn_norm.bias"} <= names


@pytest.mark.parametrize("family", FAMILIES)
def test_block_hessians_shared_by_identical_inputs(tiny_model_factory, family):
    """One accumulator per distinct input tensor (q/k/v share one, gate/up another); each equals the Hessian of the
    inputs its linears were really fed."""
    from pbs2p.exporter import solver

    loaded = models.load(str(tiny_model_factory(family)))
    fam = arch.family_of(loaded.model.config)
    windows = torch.randint(0, loaded.model.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        inps, kwargs = driver.capture_block0_inputs(loaded.model, fam, windows, torch.device("cpu"))
        block = arch.blocks(loaded.model, fam)[0]
        lins = arch.block_linears(block, fam)
        seen = {g: [] for _, g, _ in lins}
        hooks = [lin.register_forward_hook(lambda mod, inp, out, g=g: seen[g].append(inp[0].clone()))
                 for _, g, lin in lins]
        ref_out = driver.run_block(block, inps, kwargs)
        for hk in hooks:
            hk.remove()
        out, accs, owner = driver._run_block_hessians(block, lins, inps, kwargs, torch.device("cpu"))
    assert torch.equal(out, ref_out)
    shared = {"llama": {"attn_k": "attn_q", "attn_v": "attn_q", "ffn_up": "ffn_gate"},
              "qwen2": {"attn_k": "attn_q", "attn_v": "attn_q", "ffn_up": "ffn_gate"},
              "opt": {"attn_k": "attn_q", "attn_v": "attn_q"}}[family]
    assert owner == {g: shared.get(g, g) for _, g, _ in lins}
    assert set(accs) == set(owner.values())
    for g, o in owner.items():
        ref = solver.HessianAccumulator(seen[g][0].shape[-1])
        for x in seen[g]:
            ref.add_batch(x)
        assert torch.equal(accs[o].H, ref.H), g


def test_byte_identical_reexport(tiny_model_factory, tmp_path):
    d = tiny_model_factory("llama")
    do_export(d, tmp_path / "a.bin", nm=(6, 8))
    do_export(d, tmp_path / "b.bin", nm=(6, 8))
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()
    do_export(d, tmp_path / "c.bin", nm=(6, 8), seed=1)
    assert (tmp_path / "a.bin").read_bytes() != (tmp_path / "c.bin").read_bytes()


def test_fp16_method_and_embed_types(tiny_model_factory, tmp_path):
    d = tiny_model_factory("llama")
    comp, stats = do_export(d, tmp_path / "f.bin", method="fp16", embed_type="f16")
    r, kv = fields(tmp_path / "f.bin")
    t = {x.name: x for x in r.tensors}
    assert not any(n.endswith(".planes") for n in t)
    assert t["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert t["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert kv["pbs2p.method"] == "fp16" and kv["pbs2p.nm.m"] == 0
    assert stats["storage_bpw"] == pytest.approx(16.0)
    fq = fakequant.load_fakequant(tmp_path / "f.bin")
    ids = torch.arange(1, 20)[None]
    with torch.no_grad():
        assert torch.equal(comp.model(ids).logits, fq(ids).logits)
    do_export(d, tmp_path / "q.bin", method="fp16")
    t = {x.name: x for x in gguf.GGUFReader(str(tmp_path / "q.bin")).tensors}
    assert t["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert t["output.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0


def test_storage_bpw_counts_file_bytes(exported):
    fam, nm, out, comp, stats = exported
    r, kv = fields(out)
    lin = [t for t in r.tensors if t.name.endswith((".planes", ".alpha", ".mu"))]
    assert stats["linear_bytes"] == sum(int(t.n_bytes) for t in lin)
    total_w = sum(int(np.prod(rec.shape)) for rec in comp.records)
    assert stats["linear_weights"] == total_w
    assert stats["storage_bpw"] == pytest.approx(8 * stats["linear_bytes"] / total_w)
    assert stats["file_bytes"] == out.stat().st_size


def test_q4_0_is_ggml_q4_0():
    """format.quantize_q4_0 writes the bytes of ggml's reference quantizer (gguf-py's port of it), and
    dequantize_q4_0 reads them as gguf-py does: the Q4_0 head is an ordinary llama.cpp Q4_0 tensor."""
    from gguf import quants

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((16, 96)) * rng.uniform(0.01, 3, (16, 1))).astype(np.float32)
    x[0, :32] = 0  # d = 0
    x[1, :32] = 0.5
    x[1, 5] = -0.5  # magnitude tie: the first one sets the sign of d
    x[2, :32] = np.linspace(-1, 1, 32)
    q = fmt.quantize_q4_0(x)
    assert q.shape == (16, 3 * 18)
    ref = quants.quantize(x, gguf.GGMLQuantizationType.Q4_0).view(np.uint8).reshape(q.shape)
    assert np.array_equal(q, ref)
    deq = fmt.dequantize_q4_0(q, 96)
    assert np.array_equal(deq, quants.dequantize(q, gguf.GGMLQuantizationType.Q4_0).reshape(x.shape))
    assert np.abs(deq - x).max() <= np.abs(x).max() / 8 + 1e-6


def test_act_quant_matches_numpy_quantizer():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 200, generator=g) * 3
    x[0, 0, :128] = 0  # an all-zero block
    x[1, 1, 5] = 127.0 / 254  # halves on the grid: x * 127 / amax hits .5 exactly
    x[1, 1, 6] = -1.0
    x[1, 1, 7:128] = 0.25
    q, s = fmt.quantize_act(x.numpy(), 128)
    want = np.concatenate([q[..., :128] * s[..., :1], q[..., 128:] * s[..., 1:2]], axis=-1).astype(np.float32)
    got = fakequant.quantize_act(x, 128).numpy()
    assert np.array_equal(got, want)


def test_act_quant_model_wraps_only_sb_linears(tiny_model_factory, tmp_path):
    d = tiny_model_factory("qwen2")
    do_export(d, tmp_path / "m.bin", nm=(6, 8))
    m = fakequant.load_fakequant(tmp_path / "m.bin", act_quant=True)
    wrapped = [n for n, mod in m.named_modules() if isinstance(mod, fakequant.ActQuantLinear)]
    assert len(wrapped) == 2 * 7
    plain = fakequant.load_fakequant(tmp_path / "m.bin")
    ids = torch.arange(1, 30)[None]
    with torch.no_grad():
        a, b = m(ids).logits, plain(ids).logits
    assert not torch.equal(a, b) and torch.allclose(a, b, atol=0.2)


# coarse stage ------------------------------------------------------------------------------------------------

def test_coarse_exact_total_and_bounds():
    cos = [0.9, 0.5, 0.95, 0.7, 0.99, 0.3, 0.8, 0.85]
    for n_t in (4, 5, 6, 7):
        n = coarse.allocate(cos, n_t, 8)
        assert sum(n) == n_t * len(cos)
        assert all(max(1, n_t - 1) <= x <= min(8, n_t + 1) for x in n)
    n = coarse.allocate(cos, 6, 8)
    assert n[5] >= n[4]  # the block that changes its input most (lowest cos) keeps at least as much


def test_coarse_uniform_and_clamped():
    assert coarse.allocate([0.5] * 4, 6, 8) == [6] * 4
    # clamped cos -> I = [~4, ~0, ~0, ~0] -> [7, 5, 5, 5]; repair raises the lowest-index ties first
    assert coarse.allocate([-0.5, 0.9, 0.9, 0.9], 6, 8) == [7, 6, 6, 5]
    n = coarse.allocate([0.1, 0.99], 8, 8)
    assert n == [8, 8]
    n = coarse.allocate([0.1, 0.99, 0.99], 1, 8)
    assert all(1 <= x <= 2 for x in n) and sum(n) == 3


def test_coarse_unequal_weights_never_overshoots():
    n = coarse.allocate([0.2, 0.9, 0.9], 6, 8, weights=[3, 2, 2])
    total = sum(w * x for w, x in zip([3, 2, 2], n))
    assert n == [7, 5, 5] and total == 41  # 42 is unreachable without overshooting by a weight of 2


def test_coarse_in_pipeline_changes_n(tiny_model_factory, tmp_path, monkeypatch):
    monkeypatch.setattr(coarse, "allocate", lambda cos, n, m, w=None: [n + 1, n - 1])
    comp, _ = do_export(tiny_model_factory("opt"), tmp_path / "o.bin", nm=(6, 8), coarse=True)
    _, kv = fields(tmp_path / "o.bin")
    assert list(kv["pbs2p.nm.n"]) == [7, 5]
    comp, _ = do_export(tiny_model_factory("opt"), tmp_path / "p.bin", nm=(6, 8))  # the default: uniform N
    _, kv = fields(tmp_path / "p.bin")
    assert list(kv["pbs2p.nm.n"]) == [6, 6]


# architecture guards ------------------------------------------------------------------------------------------

def test_unsupported_architectures():
    import transformers

    with pytest.raises(arch.UnsupportedModelError, match="supported: LlamaForCausalLM"):
        arch.family_of(transformers.GPT2Config(architectures=["GPT2LMHeadModel"]))
    with pytest.raises(arch.UnsupportedModelError, match="do_layer_norm_before"):
        arch.family_of(transformers.OPTConfig(do_layer_norm_before=False, architectures=["OPTForCausalLM"]))
    with pytest.raises(arch.UnsupportedModelError, match="word_embed_proj_dim"):
        arch.family_of(transformers.OPTConfig(word_embed_proj_dim=512, hidden_size=1024,
                                           architectures=["OPTForCausalLM"]))


def test_rope_scaling_metadata(tmp_path):
    import transformers

    def through_file(c):
        """The architecture keys of c written to a file and read back: (keys, the config the reader rebuilds)."""
        rows = arch.metadata(c, arch.LLAMA, 100)
        with fmt.ModelWriter(tmp_path / "r.bin", "llama", overwrite=True) as w:
            for k, v, t in rows:
                w.add_kv(k, v, t)
        kv = {k: v for k, v, _ in rows}
        return kv, arch.config_from_file(fmt.ModelFile(tmp_path / "r.bin"), tied=True)

    a = fmt.arch_name("llama")
    c = transformers.LlamaConfig(max_position_embeddings=131072, rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "rope_theta": 500000.0})
    kv, c2 = through_file(c)
    assert kv[f"{a}.rope.scaling.type"] == "llama3" and kv[f"{a}.rope.freq_base"] == 500000.0
    assert kv[f"{a}.rope.scaling.original_context_length"] == 8192
    assert c2.rope_parameters["rope_type"] == "llama3" and c2.rope_parameters["factor"] == 8.0
    assert c2.rope_parameters["original_max_position_embeddings"] == 8192 and c2.max_position_embeddings == 131072
    c = transformers.LlamaConfig(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    kv, c2 = through_file(c)
    assert kv[f"{a}.rope.scaling.type"] == "linear" and kv[f"{a}.rope.scaling.factor"] == 2.0
    assert c2.rope_parameters["rope_type"] == "linear" and c2.rope_parameters["factor"] == 2.0
    assert f"{a}.rope.scaling.type" not in {k for k, _, _ in arch.metadata(transformers.LlamaConfig(), arch.LLAMA, 10)}


# tokenizer metadata -------------------------------------------------------------------------------------------

def test_tokmeta_from_hf(tiny_tokenizer):
    kv = {k: v for k, v, _ in tokmeta.from_hf(tiny_tokenizer, "llama", len(tiny_tokenizer) + 5, "tiny")}
    assert kv["tokenizer.ggml.model"] == "gpt2"
    toks = kv["tokenizer.ggml.tokens"]
    assert len(toks) == len(tiny_tokenizer) + 5 and toks[-1].startswith("[PAD")
    assert toks[tiny_tokenizer.convert_tokens_to_ids("<|im_start|>")] == "<|im_start|>"
    types = kv["tokenizer.ggml.token_type"]
    assert types[tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")] == fmt.TokenType.CONTROL
    assert types[-1] == fmt.TokenType.UNUSED
    assert all(len(m.split(" ")) == 2 for m in kv["tokenizer.ggml.merges"])
    assert kv["tokenizer.ggml.bos_token_id"] == tiny_tokenizer.bos_token_id
    assert "im_start" in kv["tokenizer.chat_template"]
    assert tokmeta.from_hf(tiny_tokenizer, "qwen2", len(tiny_tokenizer))[1][1] == "qwen2"


def test_tokmeta_from_gguf_is_verbatim(smollm2_path):
    kv = {k: v for k, v, _ in tokmeta.from_gguf(smollm2_path, 49152)}
    assert kv["tokenizer.ggml.pre"] == "smollm" and kv["tokenizer.ggml.model"] == "gpt2"
    assert len(kv["tokenizer.ggml.tokens"]) == 49152 and kv["tokenizer.ggml.tokens"][1] == "<|im_start|>"
    assert kv["tokenizer.ggml.merges"][0] == "Ġ t"


# calibration --------------------------------------------------------------------------------------------------

def test_calibration_file_windows(tmp_path, tiny_tokenizer):
    from pbs2p.exporter import calib

    p = tmp_path / "c.jsonl"
    p.write_text('{"text": "one two three four five six seven eight nine ten"}\n'
                 '{"text": "the quick brown fox jumps over the lazy dog"}\n' * 20)
    w1, desc = calib.get_windows(str(p), None, tiny_tokenizer, 5, 16, 0)
    w2, _ = calib.get_windows(str(p), None, tiny_tokenizer, 5, 16, 0)
    w3, _ = calib.get_windows(str(p), None, tiny_tokenizer, 5, 16, 1)
    assert w1.shape == (5, 16) and torch.equal(w1, w2) and not torch.equal(w1, w3)
    assert "c.jsonl" in desc and "5" in desc
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": 1}\n')
    with pytest.raises(calib.CalibrationError, match="text"):
        calib.get_windows(str(bad), None, tiny_tokenizer, 1, 4, 0)
    with pytest.raises(calib.CalibrationError, match="fewer than one window"):
        calib.get_windows(str(p), None, tiny_tokenizer, 1, 100000, 0)
    with pytest.raises(calib.CalibrationError, match="no such"):
        calib.get_windows(str(tmp_path / "missing.txt"), None, tiny_tokenizer, 1, 4, 0)


def test_calibration_hf_without_datasets(tiny_tokenizer, monkeypatch):
    import builtins

    from pbs2p.exporter import calib

    real = builtins.__import__

    def fake(name, *a, **k):
        if name == "datasets":
            raise ImportError("no datasets")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(calib.CalibrationError, match="datasets"):
        calib.get_windows("hf:allenai/c4", None, tiny_tokenizer, 1, 4, 0)


def test_interrupt_leaves_no_file(tiny_model_factory, tmp_path, monkeypatch):
    from pbs2p.exporter import solver

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(solver, "compress_layer", boom)
    with pytest.raises(KeyboardInterrupt):
        do_export(tiny_model_factory("llama"), tmp_path / "x.bin")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    monkeypatch.setattr(fmt.ModelWriter, "add_sb", boom)  # interrupted while writing
    with pytest.raises(KeyboardInterrupt):
        do_export(tiny_model_factory("llama"), tmp_path / "y.bin")
    assert list(tmp_path.iterdir()) == []


def test_perplexity_protocol():
    from pbs2p.exporter import eval as evaluation

    class Uniform(torch.nn.Module):
        def forward(self, x, use_cache=False):
            class O:
                logits = torch.zeros(x.shape[0], x.shape[1], 50)
            return O()

    ids = torch.arange(105) % 50
    ppl, n, _ = evaluation.perplexity(Uniform(), ids, 10, progress=False)
    assert n == 10 * 9 and ppl == pytest.approx(50.0)
    ppl, n, _ = evaluation.perplexity(Uniform(), ids, 10, max_windows=3, progress=False)
    assert n == 27
    with pytest.raises(evaluation.EvalError):
        evaluation.perplexity(Uniform(), ids, 200, progress=False)
