"""What an export is asked to do: QuantConfig (the method, the N:M target, the solver's per-layer settings nested
as a SolverConfig, calibration, embeddings, device), parsed and checked once, before any work."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from pbs2p.format import spec

from . import planner
from .solver import SolverConfig

METHODS = spec.METHODS  # "fp16": dense F16 linears, no calibration, no solver; "plan": the --bpw budget planner
EMBED_TYPES = {"q8_0": spec.GGMLType.Q8_0, "q4_0": spec.GGMLType.Q4_0, "f16": spec.GGMLType.F16,
               "f32": spec.GGMLType.F32}
DEVICES = "cpu or cuda"


class ExportError(ValueError):
    """A bad export request (the CLI prints it as one line)."""


def parse_nm(s: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """'dense' (or None) -> None; 'N:M' (or (N, M)) -> (N, M) under the spec's N:M rule (M in spec.ALLOWED_M,
    1 <= N <= M); N == M keeps every weight, which is dense -> None."""
    if s is None:
        return None
    if isinstance(s, str):
        if s.strip().lower() == "dense":
            return None
        try:
            n_s, m_s = s.split(":")
            n, m = int(n_s), int(m_s)
        except ValueError:
            raise ExportError(f"--nm {s!r}: expected N:M (e.g. 6:8) or dense") from None
    else:
        n, m = (int(x) for x in s)
    try:
        spec.check_nm(n, m)
    except spec.FormatError as e:
        raise ExportError(f"--nm {n}:{m}: {str(e).split(': ', 1)[1]}") from None
    return None if n == m else (n, m)


@dataclass(frozen=True)
class QuantConfig:
    """One export. `method` and `nm` say what to make; `solver` holds the per-layer settings (docs/algorithm.md)
    and takes its method, N and M from them — set those two here, not on the nested SolverConfig:

        QuantConfig(method="pbs2p", nm="6:8", solver=SolverConfig(salient=True), calib="c4.jsonl")
    """

    method: str = "pbs2p"
    nm: tuple[int, int] | str | None = (6, 8)  # "N:M", (N, M) or "dense"/None; stored as (N, M) or None
    coarse: bool = False      # the paper's CFS coarse stage (per-block N); off: docs/algorithm.md, "CFS coarse stage"
    solver: SolverConfig = field(default_factory=SolverConfig)
    embed_type: str = "q8_0"  # embeddings / output head: EMBED_TYPES
    calib: str = "self"       # self | a .txt/.jsonl file | hf:NAME
    nsamples: int = 32
    seqlen: int = 512
    seed: int = 0
    device: str = "cpu"
    progress: bool = True
    checkpoint: str | None = None  # folder for per-block checkpoints (exporter/checkpoint.py); None: none
    bpw: float | None = None  # method "plan": the linears' target storage bits per weight (exporter/planner.py)
    codes: tuple[str, ...] = planner.DEFAULT_CODES  # method "plan": the codes it may choose from
    sensitivity: str = "fisher"  # method "plan": the damage estimate (planner.SENSITIVITIES)
    measurements: str | None = None  # method "plan": JSON file of pass 1's table, reused when it matches, else written
    tie_head: bool = False  # one matrix for token table and output head (arch.tie_head), when the model stores two
    max_bytes: int | None = None  # method "plan", in place of bpw: the whole file's bytes at most (driver.quantize
    #                               turns it into the bpw the linears can have beside the rest of the file)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ExportError(f"--method {self.method!r}: choose one of {', '.join(METHODS)}")
        if (self.bpw is not None or self.max_bytes is not None) and self.method != "plan":
            flag = "--bpw" if self.bpw is not None else "--max-bytes"
            raise ExportError(f"{flag} is the budget planner's (method plan); --method {self.method} takes no budget")
        if self.method == "plan":
            self._check_plan()
        elif self.measurements:
            raise ExportError("--measurements holds the budget planner's pass 1: it needs --bpw")
        # fp16 prunes nothing and the planner picks N:M per linear: --nm does not apply to either
        nm = None if self.method in ("fp16", "plan") else parse_nm(self.nm)
        object.__setattr__(self, "nm", nm)
        if not isinstance(self.solver, SolverConfig):
            raise ExportError(f"solver must be a SolverConfig, got {type(self.solver).__name__}")
        default = SolverConfig()
        if (self.solver.method, self.solver.n, self.solver.m) != (default.method, default.n, default.m) and \
                (self.solver.method, self.solver.n, self.solver.m) != self._target():
            raise ExportError("set method and nm on QuantConfig, not on its nested SolverConfig")
        if self.method not in ("fp16", "plan"):
            object.__setattr__(self, "solver", dataclasses.replace(self.solver, **dict(zip(("method", "n", "m"),
                                                                                           self._target()))))
        if self.embed_type not in EMBED_TYPES:
            raise ExportError(f"--embed-type {self.embed_type!r}: choose one of {', '.join(EMBED_TYPES)}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ExportError(f"--device {self.device!r}: use {DEVICES}")
        if self.nsamples <= 0 or self.seqlen <= 1:
            raise ExportError(f"--nsamples {self.nsamples} / --seqlen {self.seqlen}: need >= 1 and >= 2")

    def _check_plan(self) -> None:
        if self.bpw is not None and self.max_bytes is not None:
            raise ExportError("--bpw and --max-bytes are two budgets: give one")
        if self.max_bytes is not None:
            if isinstance(self.max_bytes, bool) or not isinstance(self.max_bytes, int) or self.max_bytes <= 0:
                raise ExportError(f"--max-bytes {self.max_bytes!r}: a positive whole number of bytes")
        elif self.bpw is None:
            raise ExportError("--method plan needs a budget: --bpw B (storage bits per weight of the linears) or "
                              "--max-bytes N (the whole file)")
        else:
            self._check_bpw()
        self._check_codes()

    def _check_bpw(self) -> None:
        try:
            bpw = float(self.bpw)
        except (TypeError, ValueError):
            raise ExportError(f"--bpw {self.bpw!r}: a number of bits per weight") from None
        if not (math.isfinite(bpw) and bpw > 0):
            raise ExportError(f"--bpw {self.bpw}: must be a positive number")
        object.__setattr__(self, "bpw", bpw)

    def _check_codes(self) -> None:
        codes = (self.codes,) if isinstance(self.codes, str) else tuple(self.codes)
        bad = [c for c in codes if c not in planner.CODES]
        if bad or not codes:
            raise ExportError(f"--codes {','.join(codes)}: choose from {', '.join(planner.CODES)}")
        object.__setattr__(self, "codes", tuple(dict.fromkeys(codes)))
        if self.sensitivity not in planner.SENSITIVITIES:
            raise ExportError(f"--sensitivity {self.sensitivity!r}: choose one of {', '.join(planner.SENSITIVITIES)}")
        if self.coarse:
            raise ExportError("--coarse sets N per block; the planner chooses a code per linear: use one of them")

    def _target(self) -> tuple[str, int, int]:
        """(method, N, M) of the nested solver: dense is N = M = 8."""
        n, m = self.nm if isinstance(self.nm, tuple) else (8, 8)
        return (self.method if self.method != "fp16" else SolverConfig().method), n, m

    @property
    def block_size(self) -> int:
        return self.solver.block_size

    def layer_solver(self, n: int) -> SolverConfig:
        """The solver settings of one block whose kept count is n (differs from the target with the coarse stage)."""
        return dataclasses.replace(self.solver, n=n) if self.nm else self.solver

    def plan_shapes_check(self, shapes: dict[str, tuple[int, int]]) -> None:
        """Method plan: refuse a budget outside what the codes can reach on these linears (before any work)."""
        if self.method != "plan":
            return
        try:
            lo, hi = planner.reachable(shapes, self.codes, self.solver)
        except ValueError as e:
            raise ExportError(f"--codes: {e}") from None
        if not lo <= self.bpw <= hi:
            raise ExportError(f"--bpw {self.bpw}: out of reach; with codes {', '.join(self.codes)} this model's "
                              f"linears take {lo:.3f} to {hi:.3f} bits per weight")

    def use_coarse(self) -> bool:
        return self.coarse and self.nm is not None and self.method != "fp16"


def solver_config(**knobs) -> SolverConfig:
    """A SolverConfig from the CLI's knobs; an invalid value is an ExportError (SolverConfig's own message)."""
    try:
        return SolverConfig(**knobs)
    except ValueError as e:
        raise ExportError(str(e)) from None
