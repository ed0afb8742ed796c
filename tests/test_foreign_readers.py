"""Other GGUF readers must refuse a pbs2p file cleanly, never misread it.

A pbs2p file is a GGUF file with llama.cpp's tensor names, but its sparse-binary linears (.planes/.alpha/.mu) and
its unpermuted Q/K mean nothing to llama.cpp or transformers. Since format version 2 the file's
general.architecture is "pbs2p-<family>", a name neither knows (docs/format.md, "Versioning")."""
from __future__ import annotations

import gguf
import pytest
import transformers

from pbs2p import format as fmt
from pbs2p.exporter import QuantConfig, driver


@pytest.fixture(scope="module", params=["pbs2p", "fp16"])
def exported(request, tiny_model_factory, tmp_path_factory):
    out = tmp_path_factory.mktemp("foreign") / f"{request.param}.bin"
    cfg = QuantConfig(method=request.param, nm="6:8", nsamples=2, seqlen=16, progress=False)
    driver.export(str(tiny_model_factory("llama")), out, cfg)
    return out


def test_architecture_is_our_own(exported):
    mf = fmt.ModelFile(exported)
    assert mf.arch == "pbs2p-llama" and mf.family == "llama" and mf.version == fmt.BASE_FORMAT_VERSION == 2
    # gguf-py's MODEL_ARCH_NAMES mirrors llama.cpp's architecture table: a name outside it is refused there
    # ("unknown model architecture") before any tensor is read
    assert mf.arch not in set(gguf.MODEL_ARCH_NAMES.values())
    assert "llama" in set(gguf.MODEL_ARCH_NAMES.values())  # the table is the one llama.cpp reads


def test_transformers_refuses_the_file(exported):
    with pytest.raises(ValueError, match="pbs2p-llama"):
        transformers.AutoModelForCausalLM.from_pretrained(str(exported.parent), gguf_file=exported.name)


def test_version_one_names_still_read():
    """A version-1 file named the bare family; readers accept that for version 1 only."""
    assert fmt.family_of_arch("llama", 1) == "llama" and fmt.family_of_arch("pbs2p-qwen2", 2) == "qwen2"
    for arch, version in (("llama", 2), ("pbs2p-llama", 1), ("pbs2p-gpt2", 2), ("llama", 3)):
        with pytest.raises(fmt.FormatError):
            fmt.family_of_arch(arch, version)
