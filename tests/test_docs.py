"""The front door and the manual: README size and links, the Sphinx site (built with warnings as
errors, its API page rendered in headless Chromium), and every code block of the README and the
guide run as written."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from browser import dump_dom

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
# The guide: the manual's own pages (generated reports under docs/results etc. are not guide).
GUIDE = sorted(DOCS.glob("*.md"))
FENCE = re.compile(r"^```(\w+)[^\n]*\n(.*?)^```", re.S | re.M)


def _blocks(path: Path, lang: str) -> list[str]:
    return [code for kind, code in FENCE.findall(path.read_text()) if kind == lang]


def _sphinx(src: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-W",
            "--keep-going",
            "-q",
            "-b",
            "html",
            str(src),
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )


# --- README -------------------------------------------------------------------------------------


def test_readme_is_a_short_front_door():
    text = README.read_text()
    lines = text.splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; the details belong in docs/"
    first = _blocks(README, "bash")[0].strip().splitlines()
    assert len(first) == 2, "the README starts with exactly two set-up commands"
    assert first[0].startswith("bash scripts/install.sh && .venv/bin/l2bn compare")
    assert (
        first[1].split("#")[0].strip()
        == "bash scripts/install.sh && .venv/bin/python -m pytest -q -n auto --dist worksteal"
    )
    ci = (ROOT / ".ci" / "run").read_text()
    assert first[1].split("#")[0].strip() in ci, ".ci/run must run the README's test command"
    # every page of the guide is one click away
    linked = set(re.findall(r"\]\(docs/([\w-]+\.md)\)", text))
    missing = {p.name for p in GUIDE} - linked - {"index.md", "mutation-fused.md"}
    assert not missing, f"guide pages the README does not link: {sorted(missing)}"


def test_markdown_links_point_at_files():
    """Relative links of the README and the guide name files that exist (the site build checks
    the same for the pages it renders)."""
    broken = []
    for page in [README, *GUIDE]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            if not (page.parent / target.split("#")[0]).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken


# --- the site -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    r = _sphinx(DOCS, out)
    assert r.returncode == 0, f"the manual does not build with -W:\n{r.stderr[-4000:]}"
    return out


def test_site_has_every_guide_page(site):
    for page in GUIDE:
        assert (site / page.with_suffix(".html").name).is_file(), page.name


def test_api_page_renders_the_layer_with_its_signature(site, tmp_path):
    dom = dump_dom(site / "api.html", tmp_path)
    assert 'id="l2bn.L2BatchNorm2d"' in dom, dom[:500]
    # the signature, as Sphinx renders it, and the docstring's formula and arguments
    sig = dom[dom.index('id="l2bn.L2BatchNorm2d"') :][:6000]
    text = " ".join(re.sub(r"<[^>]+>", "", sig).split())
    for part in (
        "class l2bn.L2BatchNorm2d(num_features: int, eps: float = 1e-05, momentum:",
        "affine: bool = True",
        "unit_rms: bool = False",
        "l2_eps: float = 1e-12",
    ):
        assert part in text, (part, text[:800])
    for name in (
        "l2bn.convert",
        "l2bn.update_bn",
        "l2bn.functional.l2_batch_norm",
        "l2bn.keras.L2BatchNormalization",
        "l2bn.SyncL2BatchNorm",
    ):
        assert f'id="{name}"' in dom, name


def test_a_broken_link_fails_the_build(tmp_path):
    """Warnings are errors: a link to a page that does not exist stops the build."""
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(DOCS / "conf.py", src / "conf.py")
    (src / "index.md").write_text("# Title\n\nSee [the layer](layer-that-is-not-here.md).\n")
    r = _sphinx(src, tmp_path / "out")
    assert r.returncode != 0 and "layer-that-is-not-here" in r.stderr, r.stderr[-2000:]


# --- code blocks --------------------------------------------------------------------------------

# Runs the blocks of one page in order, in one namespace (as a reader pastes them), recording
# each block's warnings (Python's default filters, as a user's script). A block may warn only
# where it says so in a comment ("warns"); quoted code that is not ours to run is fenced as
# ``{code-block} python``.
_RUNNER = r"""
import json, sys, warnings, io, contextlib
blocks = json.load(open(sys.argv[1]))
ns = {"__name__": "__main__"}
out = []
for code in blocks:
    err = io.StringIO()
    with warnings.catch_warnings(record=True) as w, contextlib.redirect_stderr(err):
        exec(compile(code, "<block>", "exec"), ns)
    said = [f"{x.category.__name__}: {x.message}" for x in w]
    out.append({"warnings": said, "stderr": err.getvalue()})
print("RESULT" + json.dumps(out))
"""


def _pages_with_python():
    seen, pages = set(), []
    for page in [README, *GUIDE]:
        blocks = [b for b in _blocks(page, "python") if b not in seen]
        seen.update(blocks)
        if blocks:
            pages.append(pytest.param(page, blocks, id=page.name))
    return pages


@pytest.mark.parametrize("page,blocks", _pages_with_python())
def test_python_blocks_run_as_written(page, blocks, tmp_path):
    (tmp_path / "blocks.json").write_text(json.dumps(blocks))
    r = subprocess.run(
        [sys.executable, "-c", _RUNNER, str(tmp_path / "blocks.json")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert r.returncode == 0, f"{page.name}:\n{r.stderr[-3000:]}"
    results = json.loads(r.stdout.split("RESULT", 1)[1])
    for code, res in zip(blocks, results):
        said = "warns" in code
        if said:
            assert res["warnings"], f"{page.name}: the block says it warns but does not:\n{code}"
        else:
            assert not res["warnings"], (
                f"{page.name}: unexplained warnings {res['warnings']}:\n{code}"
            )
        assert said or not res["stderr"].strip(), f"{page.name}: printed {res['stderr']!r}:\n{code}"


def _l2bn_commands():
    """Every ``l2bn ...`` command line of the README's and the guide's shell blocks."""
    cmds = []
    for page in [README, *GUIDE]:
        for block in _blocks(page, "bash"):
            joined = block.replace("\\\n", " ")
            for line in joined.splitlines():
                line = line.split(" #")[0].strip()
                m = re.search(
                    r"(?:^|\s|/)l2bn (train|compare|analyze|report|bench|eps-trap)(?=\s|$)(.*)",
                    line,
                )
                if m:
                    cmds.append(
                        pytest.param(m.group(1) + m.group(2), id=f"{page.name}:{m.group(1)}")
                    )
    return cmds


@pytest.mark.parametrize("command", _l2bn_commands())
def test_shell_commands_parse(command):
    """The CLI accepts every documented command line (flags and values; nothing is run)."""
    from l2bn.cli import build_parser

    argv = [a for a in shlex.split(command) if a != "..."]
    argv = [a.replace("$DATA", "DATA").replace("$net", "resnet") for a in argv]
    try:
        build_parser().parse_args(argv)
    except SystemExit as e:  # argparse's way of rejecting
        pytest.fail(f"l2bn {command!r} is rejected by the CLI (exit {e.code})")
