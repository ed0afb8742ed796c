"""Pythonic wrapper of the C runtime: load a model file, generate text, chat, tokenize, logits, perplexity.

One `Runtime` owns one model and one context (KV cache, thread pool). The generation loop runs in Python, one
`pbs2p_eval` call per token; cffi releases the GIL during each call, so other Python threads run meanwhile
and Ctrl-C (KeyboardInterrupt) is delivered between tokens. The Python-side token list `_tokens` always mirrors
what the KV cache holds, which lets consecutive prompts reuse a common prefix and keeps the runtime usable
after an interrupted call.
"""
from __future__ import annotations

import codecs
import logging
import math
import os
import random
import threading
from enum import IntEnum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from . import _ffi

ffi = _ffi.ffi
logger = logging.getLogger("pbs2p")

__all__ = ["Runtime", "ModelInfo", "Pbs2pError", "Status", "TextStream", "error_class", "lib"]


# ---- errors -------------------------------------------------------------------------------------------------

class Status(IntEnum):
    """Mirror of `pbs2p_status` in runtime/include/pbs2p.h (tests/test_format_c.py checks them equal)."""

    OK = 0
    ERR_IO = 1
    ERR_FORMAT = 2
    ERR_VERSION = 3
    ERR_UNSUPPORTED = 4
    ERR_NOMEM = 5
    ERR_INVALID_ARG = 6
    ERR_CONTEXT_FULL = 7
    ERR_ABORTED = 8
    ERR_BUFFER_TOO_SMALL = 9
    ERR_BUSY = 10


class Pbs2pError(RuntimeError):
    """A failure reported by the C library: `status` (a Status) and the library's message."""

    def __init__(self, status: int, message: str = "") -> None:
        try:
            self.status: Status | int = Status(status)
        except ValueError:
            self.status = status
        self.message = message
        name = self.status.name if isinstance(self.status, Status) else str(status)
        super().__init__(f"{name}: {message}" if message else name)


class IOFailure(Pbs2pError):
    pass


class FormatError(Pbs2pError):
    pass


class VersionError(Pbs2pError):
    pass


class UnsupportedError(Pbs2pError):
    pass


class OutOfMemory(Pbs2pError):
    pass


class InvalidArgument(Pbs2pError):
    pass


class ContextFull(Pbs2pError):
    pass


class Aborted(Pbs2pError):
    pass


class BufferTooSmall(Pbs2pError):
    pass


class Busy(Pbs2pError):
    pass


_ERRORS: dict[int, type[Pbs2pError]] = {
    Status.ERR_IO: IOFailure, Status.ERR_FORMAT: FormatError, Status.ERR_VERSION: VersionError,
    Status.ERR_UNSUPPORTED: UnsupportedError, Status.ERR_NOMEM: OutOfMemory,
    Status.ERR_INVALID_ARG: InvalidArgument, Status.ERR_CONTEXT_FULL: ContextFull, Status.ERR_ABORTED: Aborted,
    Status.ERR_BUFFER_TOO_SMALL: BufferTooSmall, Status.ERR_BUSY: Busy,
}


def error_class(status: int) -> type[Pbs2pError]:
    return _ERRORS.get(int(status), Pbs2pError)


def _error(status: int) -> Pbs2pError:
    """The exception for a failed call; must run in the failing thread right after the call
    (pbs2p_last_error is thread-local and valid until the next call)."""
    msg = ffi.string(lib().pbs2p_last_error()).decode("utf-8", "replace")
    return error_class(status)(status, msg)


def _check(status: int) -> None:
    if status != 0:
        raise _error(status)


# ---- library + log routing ------------------------------------------------------------------------------------

_LOG_LEVELS = {0: logging.ERROR, 1: logging.WARNING, 2: logging.INFO, 3: logging.DEBUG}


@ffi.callback("void(int32_t, const char *, void *)")
def _log_cb(level: int, msg: Any, user: Any) -> None:  # kept alive by this module-level reference
    try:
        logger.log(_LOG_LEVELS.get(level, logging.DEBUG), "%s", ffi.string(msg).decode("utf-8", "replace").rstrip())
    except Exception:  # noqa: BLE001 - an exception must never propagate into C
        pass


_init_lock = threading.Lock()
_lib = None


def lib() -> Any:
    """The dlopened library, with its log lines routed to the `pbs2p` logger (done once)."""
    global _lib
    if _lib is None:
        with _init_lock:
            if _lib is None:
                handle = _ffi.load()
                handle.pbs2p_set_log(_log_cb, ffi.NULL)
                _lib = handle
    return _lib


# ---- model info ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelInfo:
    path: str
    arch: str
    method: str
    n_vocab: int
    n_ctx_train: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    nm_m: int
    nm_n: tuple[int, ...]      # kept N per transformer block (M if dense)
    block_size: int
    format_version: int
    file_size: int
    n_linear_weights: int
    n_linear_bytes: int
    storage_bpw: float         # 8 · linear bytes / linear weights
    param_bits: float          # the paper's "W-bits"
    extra: dict = field(default_factory=dict)

    @property
    def nm(self) -> str:
        """"2:4", "mixed 2:4/4:4", or "dense"."""
        if self.nm_m == 0:
            return "dense"
        ns = sorted(set(self.nm_n))
        return f"{ns[0]}:{self.nm_m}" if len(ns) == 1 else "mixed " + "/".join(f"{n}:{self.nm_m}" for n in ns)


# ---- the runtime ---------------------------------------------------------------------------------------------

def _positive_int(name: str, v: Any, allow_none: bool = True) -> int | None:
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return int(v)


class Runtime:
    """A loaded model with one context.

    Runtime(path, *, threads=None, context_length=None, seed=None, kernel=None)

    threads: worker threads (None: all CPUs); context_length: KV cache size in tokens (None: the model's training
    context, capped at 4096); seed: seeds the per-call sampler seeds, so a Runtime created with the same seed
    produces the same sequence of outputs; kernel: force a sparse-binary kernel ("scalar", "avx2", ...) —
    this is process-wide, like the PBS2P_KERNEL environment variable.

    Not for concurrent use: one call at a time (a second thread gets RuntimeError). Separate Runtime objects
    run in parallel from separate threads.
    """

    def __init__(self, path: str | os.PathLike[str], *, threads: int | None = None,
                 context_length: int | None = None, seed: int | None = None, kernel: str | None = None) -> None:
        self._model = ffi.NULL
        self._ctx = ffi.NULL
        self._lock = threading.Lock()
        self._owner: int | None = None
        self._tokens: list[int] = []  # what the KV cache holds, position order
        self.path = os.fspath(path)
        threads = _positive_int("threads", threads)
        context_length = _positive_int("context_length", context_length)
        if seed is not None and (not isinstance(seed, (int, np.integer)) or seed < 0):
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        if kernel is not None and not isinstance(kernel, str):
            raise ValueError(f"kernel must be a string, got {kernel!r}")
        if not os.path.exists(self.path):
            raise FileNotFoundError(f"model file not found: {self.path}")
        if os.path.isdir(self.path):
            raise IsADirectoryError(f"model path is a directory: {self.path}")
        L = lib()
        if kernel is not None:
            _check(L.pbs2p_set_kernel(kernel.encode()))
        pm = ffi.new("pbs2p_model **")
        _check(L.pbs2p_model_load(self.path.encode(), pm))
        self._model = pm[0]
        try:
            params = L.pbs2p_ctx_default_params()
            if threads is not None:
                params.n_threads = threads
            if context_length is not None:
                params.n_ctx = context_length
            pc = ffi.new("pbs2p_ctx **")
            _check(L.pbs2p_ctx_init(self._model, ffi.new("pbs2p_ctx_params *", params), pc))
            self._ctx = pc[0]
            self.info = self._read_info()
        except BaseException:
            self.close()
            raise
        self.n_vocab = self.info.n_vocab
        self.n_ctx = int(L.pbs2p_ctx_n_ctx(self._ctx))
        self._rng = random.Random(seed)
        self._metadata: dict[str, Any] | None = None

    # -- lifetime ----------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Free the context and the model (idempotent). Not while another thread is using the runtime."""
        L = _lib
        if L is None:
            return
        if self._ctx != ffi.NULL:
            L.pbs2p_ctx_free(self._ctx)
            self._ctx = ffi.NULL
        if self._model != ffi.NULL:
            L.pbs2p_model_free(self._model)
            self._model = ffi.NULL
        self._tokens = []

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_model", None) is not None:
            self.close()

    def _acquire(self) -> None:
        if self._model == ffi.NULL:
            raise ValueError("Runtime is closed")
        if not self._lock.acquire(blocking=False):
            if self._owner == threading.get_ident():
                raise RuntimeError("Runtime is busy with an unfinished generate(stream=True) iterator in this "
                                   "thread; exhaust or close() it first")
            raise RuntimeError("Runtime is in use by another thread (use one Runtime per thread)")
        self._owner = threading.get_ident()

    def _release(self) -> None:
        self._owner = None
        self._lock.release()

    def _sync_kv(self) -> None:
        """Make `_tokens` and the KV cache agree after an interrupted or failed evaluation: keep what both have."""
        L = lib()
        n = min(int(L.pbs2p_ctx_n_past(self._ctx)), len(self._tokens))
        if L.pbs2p_ctx_truncate(self._ctx, n) != 0:
            n = 0
            L.pbs2p_ctx_truncate(self._ctx, 0)
        del self._tokens[n:]

    # -- info ------------------------------------------------------------------------------------------------
    def _read_info(self) -> ModelInfo:
        L = lib()
        ci = ffi.new("pbs2p_model_info *")
        _check(L.pbs2p_model_get_info(self._model, ci))
        nm_n = tuple(int(L.pbs2p_model_layer_n(self._model, i)) for i in range(ci.n_layer))
        return ModelInfo(
            path=self.path, arch=ffi.string(ci.arch).decode(), method=ffi.string(ci.method).decode(),
            n_vocab=ci.n_vocab, n_ctx_train=ci.n_ctx_train, n_embd=ci.n_embd, n_layer=ci.n_layer,
            n_head=ci.n_head, n_head_kv=ci.n_head_kv, head_dim=ci.head_dim, n_ff=ci.n_ff, nm_m=ci.nm_m,
            nm_n=nm_n, block_size=ci.block_size, format_version=ci.format_version, file_size=ci.file_size,
            n_linear_weights=ci.n_linear_weights, n_linear_bytes=ci.n_linear_bytes,
            storage_bpw=float(ci.storage_bpw), param_bits=float(ci.param_bits))

    @property
    def metadata(self) -> dict[str, Any]:
        """All GGUF key/values of the file (read once with gguf.GGUFReader; arrays as lists)."""
        if self._metadata is None:
            from .dump import read_metadata

            self._metadata = read_metadata(self.path)
        return self._metadata

    @property
    def kernel(self) -> str:
        return ffi.string(lib().pbs2p_kernel_name()).decode()

    @property
    def bos(self) -> int | None:
        t = int(lib().pbs2p_token_bos(self._model))
        return None if t < 0 else t

    @property
    def eos(self) -> int | None:
        t = int(lib().pbs2p_token_eos(self._model))
        return None if t < 0 else t

    def is_eog(self, token: int) -> bool:
        """Whether `token` ends generation (EOS, EOT, <|im_end|>, ...)."""
        return bool(lib().pbs2p_token_is_eog(self._model, int(token)))

    def __repr__(self) -> str:
        if self._model == ffi.NULL:
            return f"<pbs2p.Runtime {self.path!r} (closed)>"
        i = self.info
        return (f"<pbs2p.Runtime {os.path.basename(self.path)!r}: {i.arch} {i.method}, {i.n_layer} layers, "
                f"n_embd={i.n_embd}, n_vocab={i.n_vocab}, {i.nm}, {i.storage_bpw:.2f} storage bpw, "
                f"{i.param_bits:.2f} param bits, {i.file_size / 2**20:.1f} MiB, n_ctx={self.n_ctx}, "
                f"kernel={self.kernel}>")

    # -- tokenizer -----------------------------------------------------------------------------------------------
    def tokenize(self, text: str | bytes, add_bos: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids of `text`. add_bos: add BOS/EOS as the model's metadata says; parse_special: match control
        tokens such as "<|im_start|>" in the text."""
        if isinstance(text, str):
            data = text.encode("utf-8")
        elif isinstance(text, (bytes, bytearray)):
            data = bytes(text)
        else:
            raise ValueError(f"text must be str or bytes, got {type(text).__name__}")
        L = lib()
        n_out = ffi.new("int32_t *")
        cap = len(data) + 8
        for _ in range(2):
            out = ffi.new("int32_t[]", cap)
            st = L.pbs2p_tokenize(self._model, data, len(data), int(add_bos), int(parse_special), out, cap, n_out)
            if st == Status.ERR_BUFFER_TOO_SMALL:
                cap = n_out[0]
                continue
            _check(st)
            return list(ffi.unpack(out, n_out[0]))
        raise Pbs2pError(Status.ERR_BUFFER_TOO_SMALL, "token count changed between calls")

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        try:
            out = [int(t) for t in ids]
        except (TypeError, ValueError):
            raise ValueError("token ids must be a sequence of integers") from None
        for t in out:
            if not 0 <= t < self.n_vocab:
                raise ValueError(f"token id {t} out of range [0, {self.n_vocab})")
        return out

    def token_bytes(self, token: int, render_special: bool = False) -> bytes:
        """The raw bytes of one token (may be part of a UTF-8 character)."""
        L = lib()
        n_out = ffi.new("int32_t *")
        buf = ffi.new("char[]", 64)
        st = L.pbs2p_token_to_piece(self._model, token, int(render_special), buf, 64, n_out)
        if st == Status.ERR_BUFFER_TOO_SMALL:
            buf = ffi.new("char[]", n_out[0])
            st = L.pbs2p_token_to_piece(self._model, token, int(render_special), buf, n_out[0], n_out)
        _check(st)
        return ffi.unpack(buf, n_out[0])

    def detokenize(self, ids: Sequence[int], render_special: bool = False) -> str:
        """The text of `ids` (invalid UTF-8 replaced by U+FFFD)."""
        return b"".join(self.token_bytes(t, render_special) for t in self._check_ids(ids)).decode("utf-8", "replace")

    def apply_chat_template(self, messages: Sequence[dict[str, str]], add_assistant: bool = True) -> str:
        if not messages:
            raise ValueError("messages is empty")
        keep, msgs = [], ffi.new("pbs2p_chat_msg[]", len(messages))
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"message {i} must be a dict with str 'role' and 'content', got {m!r}")
            role, content = ffi.new("char[]", m["role"].encode()), ffi.new("char[]", m["content"].encode())
            keep += [role, content]
            msgs[i].role, msgs[i].content = role, content
        L = lib()
        n_out = ffi.new("int32_t *")
        cap = 256 + sum(len(m["content"].encode()) + len(m["role"]) + 64 for m in messages)
        for _ in range(2):
            buf = ffi.new("char[]", cap)
            st = L.pbs2p_chat_apply(self._model, msgs, len(messages), int(add_assistant), buf, cap, n_out)
            if st == Status.ERR_BUFFER_TOO_SMALL:
                cap = n_out[0] + 1
                continue
            _check(st)
            return ffi.unpack(buf, n_out[0]).decode("utf-8", "replace")
        raise Pbs2pError(Status.ERR_BUFFER_TOO_SMALL, "chat rendering size changed between calls")

    # -- evaluation ------------------------------------------------------------------------------------------------
    def _eval(self, ids: Sequence[int], logits: Any = ffi.NULL, all_logits: bool = False) -> None:
        """Append `ids` to the KV cache (`_tokens` first, so an interruption right after stays consistent)."""
        arr = ffi.new("int32_t[]", list(ids))
        self._tokens.extend(ids)
        st = lib().pbs2p_eval(self._ctx, arr, len(ids), logits, int(all_logits))
        if st != 0:
            err = _error(st)
            self._sync_kv()
            raise err

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Logits float32 (len(ids), n_vocab) of `ids` evaluated from position 0 of a fresh context."""
        ids = self._check_ids(ids)
        if not ids:
            raise ValueError("ids is empty")
        if len(ids) > self.n_ctx:
            raise ValueError(f"{len(ids)} tokens do not fit the context of {self.n_ctx}")
        self._acquire()
        try:
            self._reset()
            out = np.empty((len(ids), self.n_vocab), dtype=np.float32)
            self._eval(ids, ffi.from_buffer("float[]", out), True)
            return out
        except BaseException:
            self._sync_kv()
            raise
        finally:
            self._release()

    def _reset(self) -> None:
        _check(lib().pbs2p_ctx_truncate(self._ctx, 0))
        self._tokens.clear()

    def perplexity(self, text_or_path: str | os.PathLike[str], seqlen: int = 2048, *, max_windows: int | None = None,
                   progress: bool = True, chunk: int = 128) -> float:
        """Perplexity with the windows of pbs2p-eval / pbs2p-run --perplexity: the whole text tokenized without
        BOS, cut into non-overlapping windows of `seqlen` tokens (an incomplete last one dropped), each window
        evaluated from an empty context, positions 1..seqlen-1 scored, NLL summed in float64.

        text_or_path: a Path, or a str naming an existing file, is read as UTF-8; any other str is the text."""
        if isinstance(text_or_path, Path) or (isinstance(text_or_path, str) and "\n" not in text_or_path
                                              and len(text_or_path) < 4096 and os.path.isfile(text_or_path)):
            text = Path(text_or_path).read_text(encoding="utf-8")
        elif isinstance(text_or_path, str):
            text = text_or_path
        else:
            raise ValueError(f"expected text or a path, got {type(text_or_path).__name__}")
        seqlen = _positive_int("seqlen", seqlen, allow_none=False)
        if seqlen < 2:
            raise ValueError("seqlen must be at least 2")
        if seqlen > self.n_ctx:
            raise ValueError(f"seqlen {seqlen} exceeds the context length {self.n_ctx} "
                             f"(create the Runtime with context_length={seqlen})")
        chunk = _positive_int("chunk", chunk, allow_none=False)
        ids = np.asarray(self.tokenize(text, add_bos=False), dtype=np.int64)
        n_win = len(ids) // seqlen
        if max_windows is not None:
            n_win = min(n_win, _positive_int("max_windows", max_windows, allow_none=False))
        if n_win == 0:
            raise ValueError(f"text has {len(ids)} tokens, fewer than one window of {seqlen}")
        from tqdm.auto import tqdm

        self._acquire()
        try:
            nll, count = 0.0, 0
            buf = np.empty((chunk, self.n_vocab), dtype=np.float32)
            for w in tqdm(range(n_win), desc="perplexity", unit="window", disable=not progress):
                win = ids[w * seqlen:(w + 1) * seqlen]
                self._reset()
                for s in range(0, seqlen - 1, chunk):  # the last token has no target: not evaluated
                    part = win[s:min(s + chunk, seqlen - 1)]
                    out = buf[:len(part)]
                    self._eval(part.tolist(), ffi.from_buffer("float[]", out), True)
                    lg = out.astype(np.float64)  # row i predicts win[s + i + 1]
                    tgt = win[s + 1:s + 1 + len(part)]
                    mx = lg.max(axis=1)
                    lse = mx + np.log(np.exp(lg - mx[:, None]).sum(axis=1))
                    nll += float((lse - lg[np.arange(len(tgt)), tgt]).sum())
                    count += len(tgt)
            return math.exp(nll / count)
        except BaseException:
            self._sync_kv()
            raise
        finally:
            self._release()

    # -- generation -----------------------------------------------------------------------------------------------
    def generate(self, prompt: str, max_tokens: int = 128, temperature: float = 0.8, top_k: int = 40,
                 top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.0, repeat_last_n: int = 64,
                 seed: int | None = None, stop: str | Sequence[str] | None = None, stream: bool = False,
                 add_bos: bool = True) -> str | Iterator[str]:
        """Continue `prompt`. temperature 0: greedy. Stops at an end-of-generation token, after `max_tokens`, when
        the context is full, or before the first occurrence of a `stop` string (not included).
        stream=True: an iterator of text pieces, each complete UTF-8 (a multi-byte character split across
        tokens is held back until complete); their concatenation equals the non-streamed text."""
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a str, got {type(prompt).__name__}")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, np.integer)) or max_tokens < 0:
            raise ValueError(f"max_tokens must be a non-negative integer, got {max_tokens!r}")
        if not temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {temperature!r}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
        if not 0 <= min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {min_p!r}")
        if not repeat_penalty > 0:
            raise ValueError(f"repeat_penalty must be > 0, got {repeat_penalty!r}")
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0:
            raise ValueError(f"top_k must be a non-negative integer, got {top_k!r}")
        if seed is not None and (not isinstance(seed, (int, np.integer)) or seed < 0):
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if any(not isinstance(s, str) or not s for s in stops):
            raise ValueError(f"stop strings must be non-empty str, got {stop!r}")
        sp = lib().pbs2p_sampler_default_params()
        sp.temperature, sp.top_k, sp.top_p, sp.min_p = float(temperature), int(top_k), float(top_p), float(min_p)
        sp.repeat_penalty, sp.repeat_last_n = float(repeat_penalty), int(repeat_last_n)
        sp.seed = int(seed) if seed is not None else self._rng.getrandbits(64)
        it = self._generate(prompt, int(max_tokens), sp, stops, add_bos)
        return it if stream else "".join(it)

    def chat(self, messages: Sequence[dict[str, str]], **kw: Any) -> str | Iterator[str]:
        """generate() on the messages rendered with the model's chat template (ending with the assistant header)."""
        return self.generate(self.apply_chat_template(messages, add_assistant=True), **kw)

    def _generate(self, prompt: str, max_tokens: int, sp: Any, stops: list[str], add_bos: bool) -> Iterator[str]:
        self._acquire()
        L = lib()
        sampler = ffi.NULL
        try:
            ids = self.tokenize(prompt, add_bos=add_bos, parse_special=True)
            if not ids:
                raise ValueError("the prompt is empty and the model adds no BOS token")
            if len(ids) >= self.n_ctx:
                raise ValueError(f"prompt of {len(ids)} tokens does not fit the context of {self.n_ctx}")
            ps = ffi.new("pbs2p_sampler **")
            _check(L.pbs2p_sampler_init(ffi.new("pbs2p_sampler_params *", sp), ps))
            sampler = ps[0]

            # Reuse the cached prefix; at least the last prompt token is evaluated again for its logits.
            common = 0
            for a, b in zip(self._tokens, ids[:-1]):
                if a != b:
                    break
                common += 1
            _check(L.pbs2p_ctx_truncate(self._ctx, common))
            del self._tokens[common:]
            logits = ffi.new("float[]", self.n_vocab)
            todo = ids[common:]
            for s in range(0, len(todo), 256):  # chunks: Ctrl-C is honoured between them
                part = todo[s:s + 256]
                self._eval(part, logits if s + len(part) == len(todo) else ffi.NULL)

            history = ffi.new("int32_t[]", self.n_ctx)
            for i, t in enumerate(self._tokens):
                history[i] = t
            text = TextStream(stops)
            for _ in range(max_tokens):
                n_hist = len(self._tokens)
                tok = int(L.pbs2p_sample(sampler, logits, self.n_vocab, history, n_hist))
                if tok < 0:
                    raise _error(Status.ERR_INVALID_ARG)
                if L.pbs2p_token_is_eog(self._model, tok):
                    break
                piece = text.push(self.token_bytes(tok))
                if piece:
                    yield piece
                if text.stopped:
                    return
                if n_hist + 1 >= self.n_ctx:
                    logger.warning("context of %d tokens is full; generation stopped", self.n_ctx)
                    break
                history[n_hist] = tok
                self._eval([tok], logits)
            piece = text.flush()
            if piece:
                yield piece
        except BaseException:
            self._sync_kv()
            raise
        finally:
            if sampler != ffi.NULL:
                L.pbs2p_sampler_free(sampler)
            self._release()


class TextStream:
    """Token bytes in, displayable text out: holds back an incomplete UTF-8 sequence (a character split across
    tokens) and any tail that could be the start of a stop string; `stopped` once a stop string appeared
    (the text before it is returned, the stop string and everything after are dropped)."""

    def __init__(self, stops: Sequence[str] = ()) -> None:
        self.stops = list(stops)
        self.stopped = False
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""

    def push(self, data: bytes) -> str:
        if self.stopped:
            return ""
        self._pending += self._dec.decode(data)
        return self._emit(final=False)

    def flush(self) -> str:
        """The held-back rest at the end of generation (an incomplete character becomes U+FFFD)."""
        if self.stopped:
            return ""
        self._pending += self._dec.decode(b"", final=True)
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        p = self._pending
        hit = min((i for i in (p.find(s) for s in self.stops) if i >= 0), default=-1)
        if hit >= 0:
            self.stopped, self._pending = True, ""
            return p[:hit]
        hold = 0 if final else _stop_prefix_len(p, self.stops)
        self._pending = p[len(p) - hold:] if hold else ""
        return p[:len(p) - hold]


def _stop_prefix_len(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string (held back: it may
    become a stop string with the next tokens)."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
