"""The package's shape: data flows one way (kernels -> layer -> model/data -> train -> analysis ->
report -> experiment -> cli; io at the bottom), and no source file grows past ~300 lines
without a reason stated in its docstring."""

import ast
import fnmatch
import re
import subprocess
from pathlib import Path

import pytest
import tomllib

SRC = Path(__file__).parent.parent / "src" / "l2bn"
LEVEL = {
    "io": 0,
    "recipes": 0,
    "kernels": 1,
    "functional": 2,
    "modules": 3,
    "running": 3,
    "sync": 3,
    "norm_act": 3,
    "keras": 3,
    "factory": 4,
    "convert": 4,
    "frozen": 4,
    "models": 5,
    "data": 5,
    "train": 6,
    "analysis": 7,
    "report": 8,
    "experiment": 9,
    "bench": 9,
    "cli": 10,
    "__main__": 10,
}


def _stage(module: str) -> str:
    return module.split(".")[0]


def _imports(path: Path):
    rel = path.relative_to(SRC).with_suffix("")
    pkg = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if node.module and node.module.startswith("l2bn."):
                    yield node.module[5:], node.lineno
                continue
            base = pkg[: len(pkg) - (node.level - 1)] if node.level > 1 else pkg
            target = ".".join(base + ([node.module] if node.module else []))
            if not node.module:  # from . import a, b
                for alias in node.names:
                    yield ".".join(base + [alias.name]), node.lineno
            elif target:
                yield target, node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("l2bn."):
                    yield alias.name[5:], node.lineno


def _sources():
    return [p for p in sorted(SRC.rglob("*.py")) if p.name != "__init__.py" or p.parent != SRC]


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(SRC)))
def test_no_upward_imports(path):
    own = _stage(".".join(path.relative_to(SRC).with_suffix("").parts))
    assert own in LEVEL, f"{path}: add its stage to LEVEL"
    bad = [
        (m, ln)
        for m, ln in _imports(path)
        if m and _stage(m) in LEVEL and LEVEL[_stage(m)] > LEVEL[own]
    ]
    assert not bad, f"{path.relative_to(SRC)} ({own}) imports from a higher stage: {bad}"


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(SRC)))
def test_files_stay_small_or_say_why(path):
    n = len(path.read_text().splitlines())
    if n > 320:
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        assert "Why one file" in doc, (
            f"{path.relative_to(SRC)} has {n} lines and no 'Why one file' note in its docstring"
        )


def test_checker_sees_an_upward_import(tmp_path):
    """The import walker resolves relative imports (a checker that saw nothing would pass)."""
    got = dict(_imports(SRC / "train" / "trainer.py"))
    assert "models" in got and "io" in got and "data.loaders" in got


def test_committed_outputs_hold_no_absolute_paths():
    """Reports and summaries under docs/ record run directories relative to their folder."""
    import re

    docs = Path(__file__).parent.parent / "docs"
    bad = []
    for p in list(docs.rglob("*.json")) + list(docs.rglob("*.md")) + list(docs.rglob("*.html")):
        text = p.read_text(errors="ignore")
        if re.search(r'"(/tmp/|/work/|/root/|/home/)', text) or re.search(
            r"\((/tmp/|/work/|/root/|/home/)", text
        ):
            bad.append(str(p.relative_to(docs)))
    assert not bad, f"absolute paths of another machine in: {bad}"


# Words from how the work was organised, not from the product. Spelled in pieces so that this
# file does not match itself.
_PROCESS = re.compile(
    "|".join(
        [
            r"\bsit" + r"tings?\b",
            r"\bround [0-9]\b",
            r"\bround-[0-9]\b",
            r"clos" + r"ing notes?",
            r"\ble" + r"nt\b",
            r"this sess" + r"ion",
            r"helper age" + r"nts?",
            r"\bsubage" + r"nts?\b",
        ]
    ),
    re.IGNORECASE,
)
_TEXT = {
    ".md",
    ".py",
    ".sh",
    ".toml",
    ".yaml",
    ".yml",
    ".html",
    ".json",
    ".txt",
    ".cpp",
    ".cfg",
    ".ini",
}


def test_the_repository_speaks_of_the_product_only():
    """README, docs, reports, code, tests and scripts date results by version, commit, machine
    and day: no words from how the work was organised (a reader cannot know what they mean)."""
    root = Path(__file__).parent.parent
    try:
        files = subprocess.run(
            ["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        files = [
            str(p.relative_to(root))
            for p in root.rglob("*")
            if p.is_file() and ".git" not in p.parts
        ]
    bad = []
    for name in files:
        p = root / name
        if p.suffix not in _TEXT or name.startswith(".ci/") or not p.is_file():
            continue
        for i, line in enumerate(p.read_text(errors="ignore").splitlines(), 1):
            if _PROCESS.search(line):
                bad.append(f"{name}:{i}: {line.strip()[:100]}")
    assert not bad, "\n".join(bad)


def test_ruff_is_clean():
    """``ruff check`` (E501 at 100 columns included) and ``ruff format --check`` pass."""
    import subprocess
    import sys

    paths = ["src", "tests", "benchmarks", "examples"]
    root = SRC.parents[1]
    for cmd in (["check", *paths], ["format", "--check", *paths]):
        r = subprocess.run(
            [sys.executable, "-m", "ruff", *cmd], capture_output=True, text=True, cwd=root
        )
        assert r.returncode == 0, f"ruff {' '.join(cmd)}:\n{r.stdout[-3000:]}{r.stderr[-1000:]}"


def test_the_package_data_ships_every_kernel_source():
    """The C++ kernel is built on the user's machine from the installed sources: every file of
    kernels/csrc (the .cpp and the headers it includes) must be in the package data."""
    pyproject = tomllib.loads((SRC.parent.parent / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["l2bn.kernels"]
    files = sorted(p.name for p in (SRC / "kernels" / "csrc").iterdir() if p.is_file())
    missing = [f for f in files if not any(fnmatch.fnmatch(f"csrc/{f}", pat) for pat in patterns)]
    assert files and not missing, f"not in package-data {patterns}: {missing}"
