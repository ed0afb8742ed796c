"""The docs are reference: every repository path they cite exists, no file names a path of some machine, and the
README stays short (docs/ and benchmarks/results/ hold the detail)."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOP = ("format", "exporter", "bindings", "runtime", "tests", "tools", "benchmarks", "docs", "examples", "cmake",
       ".ci")
# `folder/…/name.ext` or `folder/` inside backticks, starting at one of the repository's top-level folders
CITED = re.compile(r"`((?:%s)/[A-Za-z0-9_./-]*)`" % "|".join(re.escape(t) for t in TOP))
MACHINE_PATH = re.compile(r"(?<![\w.$/-])/(?:work|root|home|Users)/")


def tracked() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [ROOT / p for p in out.splitlines()]


def markdown() -> list[Path]:
    return [p for p in tracked() if p.suffix == ".md"]


def test_cited_paths_exist():
    missing = []
    for doc in markdown():
        for m in CITED.finditer(doc.read_text(encoding="utf-8")):
            cited = m.group(1).rstrip(".")
            if not (ROOT / cited).exists():
                missing.append(f"{doc.relative_to(ROOT)}: {cited}")
    assert not missing, "docs cite files that do not exist:\n" + "\n".join(missing)


def test_no_machine_paths():
    hits = []
    for p in tracked():
        if p.suffix in (".png", ".jsonl", ".json") or not p.is_file():
            continue
        for i, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if MACHINE_PATH.search(line):
                hits.append(f"{p.relative_to(ROOT)}:{i}: {line.strip()[:100]}")
    assert not hits, "absolute paths of a machine:\n" + "\n".join(hits)


def test_readme_is_short():
    n = len((ROOT / "README.md").read_text(encoding="utf-8"))
    assert n <= 7000, f"README.md has {n} characters (at most 7,000: detail belongs in docs/ and benchmarks/results/)"


def test_no_lab_notebook_words():
    """Reference docs say what is true now; the history of work sessions belongs in CHANGELOG.md and git log."""
    hits = []
    for doc in markdown():
        if doc.name == "CHANGELOG.md":
            continue
        for i, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
            if re.search(r"\bsessions?\b", line, re.IGNORECASE):
                hits.append(f"{doc.relative_to(ROOT)}:{i}: {line.strip()[:100]}")
    assert not hits, "diary wording in the docs:\n" + "\n".join(hits)


def test_readme_commands_are_what_ci_runs():
    """The README's first command sets up and runs the main job, its second is the test command .ci/run calls."""
    blocks = re.findall(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), re.DOTALL)
    main, tests = blocks[0].strip(), blocks[1].strip()
    assert main.startswith("pip install torch==2.13.0 && pip install \".[export]\"") and "pbs2p-export" in main \
        and "pbs2p-run" in main and "\n" not in main, main
    assert tests == "bash tools/test.sh"
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "bash tools/test.sh" in ci
    assert "torch==2.13.0" in (ROOT / "tools" / "test.sh").read_text(encoding="utf-8")
