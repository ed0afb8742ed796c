"""llama.cpp's side of the benchmark, through llama-cpp-python's low-level binding (no sampler, no Python
per-token work beyond one llama_decode call): the same protocol and token ids as bench-e2e.c: warm-up, prefill
of n_prompt tokens from an empty context (one llama_decode of a batch, logits of the last token), clear, then
n_gen single-token decodes from position 0. Prints one JSON line.

usage: python llama_speed.py MODEL.gguf THREADS [N_PROMPT=512] [N_GEN=128]
LLAMA_CPP_LIB_PATH picks another build of libllama (the AVX2-only one); LLAMA_SPEED_NO_EXTRA_BUFTS=1 turns off
llama.cpp's weight-repacking buffers (on this VM the native build's AMX repack dies with SIGILL: the CPU
reports AMX but the hypervisor does not enable its tile state).
"""
from __future__ import annotations

import ctypes
import json
import os
import sys
import time


def bench_token(i: int, n_vocab: int) -> int:
    """bench-e2e.c's bench_token: the same 32-bit LCG."""
    x = (2654435761 * (i + 1) + 12345) & 0xFFFFFFFF
    x ^= x >> 15
    return x % n_vocab


def main() -> None:
    path, n_threads = sys.argv[1], int(sys.argv[2])
    n_prompt = int(sys.argv[3]) if len(sys.argv) > 3 else 512
    n_gen = int(sys.argv[4]) if len(sys.argv) > 4 else 128
    import llama_cpp

    llama_cpp.llama_backend_init()
    t0 = time.perf_counter()
    mp = llama_cpp.llama_model_default_params()
    if os.environ.get("LLAMA_SPEED_NO_EXTRA_BUFTS"):
        mp.use_extra_bufts = False  # no weight repacking (AMX / interleaved) buffers
    model = llama_cpp.llama_model_load_from_file(path.encode(), mp)
    if not model:
        raise SystemExit(f"cannot load {path}")
    cp = llama_cpp.llama_context_default_params()
    cp.n_ctx = max(n_prompt, n_gen) + 16
    cp.n_batch = n_prompt
    cp.n_ubatch = n_prompt
    cp.n_threads = n_threads
    cp.n_threads_batch = n_threads
    ctx = llama_cpp.llama_init_from_model(model, cp)
    if not ctx:
        raise SystemExit("cannot create a context")
    load_s = time.perf_counter() - t0
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    n_tok = max(n_prompt, n_gen)
    toks = (llama_cpp.llama_token * n_tok)(*[bench_token(i, n_vocab) for i in range(n_tok)])
    mem = llama_cpp.llama_get_memory(ctx)

    def decode(offset: int, n: int) -> None:
        ptr = ctypes.cast(ctypes.addressof(toks) + offset * ctypes.sizeof(llama_cpp.llama_token), ctypes.POINTER(llama_cpp.llama_token))
        rc = llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(ptr, n))
        if rc != 0:
            raise SystemExit(f"llama_decode failed ({rc})")

    decode(0, min(8, n_tok))  # warm-up: weight pages, thread start
    llama_cpp.llama_synchronize(ctx)
    llama_cpp.llama_memory_clear(mem, True)

    t0, c0 = time.perf_counter(), time.process_time()
    decode(0, n_prompt)
    llama_cpp.llama_synchronize(ctx)
    logit0 = llama_cpp.llama_get_logits_ith(ctx, -1)[0]
    prefill_s, prefill_cpu = time.perf_counter() - t0, time.process_time() - c0
    llama_cpp.llama_memory_clear(mem, True)

    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(n_gen):
        decode(i, 1)
        llama_cpp.llama_synchronize(ctx)
        logit0 = llama_cpp.llama_get_logits_ith(ctx, -1)[0]
    decode_s, decode_cpu = time.perf_counter() - t0, time.process_time() - c0
    print(json.dumps({"engine": "llama.cpp", "threads": n_threads, "n_prompt": n_prompt, "n_gen": n_gen,
                      "load_s": round(load_s, 3), "prefill_s": prefill_s, "decode_s": decode_s,
                      "prefill_tok_s": n_prompt / prefill_s, "decode_tok_s": n_gen / decode_s,
                      "prefill_cpu_s": prefill_cpu, "decode_cpu_s": decode_cpu,
                      "logit0": float(logit0), "system_info": llama_cpp.llama_print_system_info().decode()}))
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(model)


if __name__ == "__main__":
    main()
