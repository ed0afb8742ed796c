"""The budget planner's plan as the file stores it (docs/format.md, "Plan"): key pbs2p.plan, a JSON object with the
target and planned bpw, the sensitivity, the candidate codes and per linear [prefix, code, bytes, damage, weights].
Plain Python: the exporter writes it, pbs2p-dump reads it."""
from __future__ import annotations

import json
from dataclasses import dataclass, field


@dataclass
class PlanEntry:
    prefix: str
    code: str
    nbytes: int
    damage: float
    weights: int


@dataclass
class Plan:
    target_bpw: float
    sensitivity: str
    codes: tuple[str, ...]
    layers: list[PlanEntry] = field(default_factory=list)

    @property
    def bpw(self) -> float:
        return 8.0 * sum(e.nbytes for e in self.layers) / max(sum(e.weights for e in self.layers), 1)

    def code(self, prefix: str) -> str:
        for e in self.layers:
            if e.prefix == prefix:
                return e.code
        raise KeyError(prefix)

    def by_code(self) -> dict[str, tuple[int, int, int]]:
        """code -> (linears, bytes, weights), the codes spending the most bytes first."""
        by: dict[str, list[int]] = {}
        for e in self.layers:
            n, b, w = by.get(e.code, (0, 0, 0))
            by[e.code] = [n + 1, b + e.nbytes, w + e.weights]
        return {c: tuple(v) for c, v in sorted(by.items(), key=lambda kv: -kv[1][1])}

    def to_json(self) -> str:
        return json.dumps({"target_bpw": self.target_bpw, "bpw": round(self.bpw, 6), "sensitivity": self.sensitivity,
                           "codes": list(self.codes),
                           "layers": [[e.prefix, e.code, e.nbytes, e.damage, e.weights] for e in self.layers]},
                          separators=(",", ":"))

    @classmethod
    def from_json(cls, s: str) -> "Plan":
        """Raises ValueError (json.JSONDecodeError is one), KeyError or TypeError on a malformed plan."""
        d = json.loads(s)
        return cls(float(d["target_bpw"]), str(d["sensitivity"]), tuple(str(c) for c in d["codes"]),
                   [PlanEntry(str(p), str(c), int(b), float(x), int(w)) for p, c, b, x, w in d["layers"]])

    def table(self, per_layer: bool = True) -> str:
        """What pbs2p-export prints: the bytes per code and, per_layer, each linear's code."""
        lines = [f"plan: target {self.target_bpw:.3f} bpw, planned {self.bpw:.3f} bpw over the linears "
                 f"(sensitivity {self.sensitivity}; codes {', '.join(self.codes)})"]
        for c, (n, b, w) in self.by_code().items():
            lines.append(f"  {c:<10} {n:>4} linears {w:>12,} weights {b:>12,} bytes ({8.0 * b / w:.3f} bpw)")
        if per_layer:
            lines.append("  " + " ".join(f"{e.prefix}={e.code}" for e in self.layers))
        return "\n".join(lines)
