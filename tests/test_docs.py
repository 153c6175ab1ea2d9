"""The README (the front page) and the reference pages in docs/ hand a new user commands
and code that work as pasted: the venv's python, a local tritonserver bound to 127.0.0.1,
commands and flags that exist, links that lead somewhere, Python that runs, and a next
step after the demo."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import pytest

from conftest import embed  # the shared server fixture: triton

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
LOOPBACK = ("--grpc-address 127.0.0.1", "--http-address 127.0.0.1", "--metrics-address 127.0.0.1")

# sscd-* words in code that are names, not commands.
NOT_COMMANDS = {"sscd-triton", "sscd-triton-admin", "sscd-triton-plan-cache",
                "sscd-trt-cache", "sscd-admin-key"}


def _commands(text: str) -> list[str]:
    """Command lines, continuation lines joined."""
    return [line.strip() for line in text.replace("\\\n", " ").splitlines() if line.strip()]


def _fences(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced code block."""
    return re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.M | re.S)


def _prose(text: str) -> str:
    """The text outside fenced code blocks."""
    return re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)


def _all_text() -> str:
    return "\n".join(page.read_text() for page in PAGES)


# --- the commands -----------------------------------------------------------------------------

def test_readme_is_a_front_page_that_links_every_docs_page():
    readme = README.read_text()
    assert len(readme.splitlines()) < 150, "the front page is read in five minutes"
    for page in DOCS:
        assert f"(docs/{page.name})" in readme, f"docs/{page.name} is not linked from README.md"
        first = page.read_text().splitlines()
        assert first[0].startswith("# ") and first[2].strip(), f"{page.name}: title, then what it covers"


def test_readme_keeps_the_two_commands():
    readme = README.read_text()
    assert "scripts/demo.sh [CHECKPOINT]   # set up .venv, export -> cpu repository" in readme
    assert "scripts/test.sh                # set up .venv, run the whole test suite" in readme


def test_docs_run_the_projects_scripts_with_the_venvs_python():
    for page in PAGES:
        bare = re.findall(r"(?<![/\w])python (?:benchmarks|client)/\w+\.py", page.read_text())
        assert not bare, f"{page.name}: outside the venv these fail: {bare}"


def test_local_tritonserver_commands_bind_loopback():
    pasted = [line for line in _commands(_all_text())
              + _commands((ROOT / "scripts" / "demo.sh").read_text())
              if re.match(r"(\.venv/bin/)?tritonserver --model-repository runs/", line)]
    assert len(pasted) >= 2, pasted
    for line in pasted:
        assert all(flag in line for flag in LOOPBACK), line


def test_demo_ends_with_the_next_command_for_your_own_folder(tmp_path):
    """demo.sh's last output: the one-command sscd-dedup on a folder of one's own, then the
    server and sscd-embed step by step."""
    script = (ROOT / "scripts" / "demo.sh").read_text()
    tail = script[script.index("export/serve_check.py"):]  # after the demo itself
    printed = subprocess.run(["bash", "-c", tail.split("\n", 1)[1]], capture_output=True,
                             text=True, timeout=30, cwd=tmp_path)
    assert printed.returncode == 0, printed.stderr
    lines = printed.stdout.strip().splitlines()
    assert lines[0].startswith("Next, the copies among your own photographs")
    assert any(line.strip().startswith(".venv/bin/sscd-dedup ~/photos --output ")
               for line in lines), lines
    assert any(line.strip().startswith(".venv/bin/sscd-embed ~/photos --output ")
               for line in lines), lines


# --- commands and flags exist ------------------------------------------------------------------

def _code_segments() -> list[tuple[str, str]]:
    """(page, one command) for every command in a shell block or an inline code span:
    continuations joined, comments cut, split at pipes, `;`, `&&` and `$(`."""
    out = []
    for page in PAGES:
        text = page.read_text()
        lines = [body for lang, body in _fences(text) if lang in ("", "bash", "sh", "console")]
        lines += [span.replace("\n", " ") for span in re.findall(r"`([^`]+)`", _prose(text))]
        for line in _commands("\n".join(lines)):
            line = re.sub(r"(^|\s)#.*", "", line)
            out += [(page.name, part.strip()) for part in re.split(r"\||;|&&|\$\(", line)
                    if part.strip()]
    return out


def _script_commands() -> dict[str, list[str]]:
    """Command word -> how to run its main: every sscd-* entry point and every script."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    runs = {}
    for name, entry in scripts.items():
        module, func = entry.split(":")
        runs[name] = [sys.executable, "-c",
                      f"import sys; from {module} import {func}; sys.exit({func}(sys.argv[1:]))"]
    for script in [*ROOT.glob("client/*.py"), *ROOT.glob("export/*.py"),
                   *ROOT.glob("benchmarks/*.py")]:
        rel = str(script.relative_to(ROOT))
        thin = re.search(r"^from (sscd_triton\.cli\.\w+) import main$", script.read_text(), re.M)
        runs[rel] = ([sys.executable, "-c", f"import sys; from {thin[1]} import main; "
                      "sys.exit(main(sys.argv[1:]))"] if thin else [sys.executable, str(script)])
    return runs


def _invocations() -> list[tuple[str, str, list[str]]]:
    """(page, command, flags) for every sscd-* command or project script in the docs."""
    runs = _script_commands()
    found = []
    for page, segment in _code_segments():
        m = (re.match(r"(?:\.venv/bin/)?(sscd-[a-z0-9-]+)\b", segment)
             or re.match(r"(?:\.venv/bin/)?(?:python3? )?((?:client|export|benchmarks)/\w+\.py)",
                         segment))
        if not m or m[1] in NOT_COMMANDS:
            continue
        flags = re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", segment[m.end():])
        found.append((page, m[1], flags))
        assert m[1] in runs, f"{page}: `{segment}`: no such command"
    return found


def _help(command: str) -> str:
    return _help_of(tuple(_script_commands()[command]))


@cache
def _help_of(run: tuple[str, ...]) -> str:
    """The command's --help, with its subcommands' (`{fit,apply}`) appended."""
    command = run[-1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}

    def one(*args):
        r = subprocess.run([*run, *args, "--help"], capture_output=True, text=True,
                           timeout=120, cwd=ROOT, env=env)
        assert r.returncode == 0, f"{command} {' '.join(args)} --help: {r.stderr[-2000:]}"
        return r.stdout

    text = one()
    subs = re.search(r"\{([a-z][\w-]*(?:,[a-z][\w-]*)+)\}", text.split("\n\n")[0])
    for sub in (subs[1].split(",") if subs else []):
        text += one(sub)
    return text


def test_every_command_and_flag_in_the_docs_exists():
    found = _invocations()
    assert {"sscd-embed", "sscd-dedup", "client/match.py", "export/build_repository.py"} <= {
        command for _, command, _ in found}, "the command scan finds nothing"
    commands = sorted({command for _, command, flags in found if flags})
    with ThreadPoolExecutor(8) as pool:
        helps = dict(zip(commands, pool.map(_help, commands)))
    missing = []
    for page, command, flags in found:
        missing += [f"{page}: {command} {flag}" for flag in flags
                    if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", helps[command])]
    assert not missing, missing


# --- links ---------------------------------------------------------------------------------------

def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6} (.+)$", _prose(page.read_text()), flags=re.M):
        slug = _slug(heading)
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_every_relative_link_leads_to_a_file_and_anchor():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", _prose(page.read_text())):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            rel = os.path.relpath(dest, ROOT)
            if not dest.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and anchor not in _anchors(dest):
                broken.append(f"{page.name}: {target} (no such heading in {rel})")
    assert not broken, broken


# --- the README's Python runs --------------------------------------------------------------------

def _python_blocks() -> list[str]:
    return [body for lang, body in _fences(README.read_text()) if lang == "python"]


@pytest.fixture
def snippet_dir(tmp_path, triton):
    """photos/a.jpg and photos/b.png, and runs/queries, runs/references, runs/photos
    embedded through the session's server, as the README's blocks expect."""
    from PIL import Image

    data = ROOT / "sscd_triton" / "data" / "photos"
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(data / "astronaut.jpg", photos / "a.jpg")
    Image.open(data / "chelsea.jpg").save(photos / "b.png")
    references = sorted(data.glob("*.jpg"))  # not the folder: its LICENSE.md would fail
    for out, sources in (("runs/queries", [photos]), ("runs/references", references),
                         ("runs/photos", [photos])):
        r = embed(*sources, "--output", tmp_path / out, "--quiet", url=triton.server.grpc_url)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return tmp_path


def test_readme_has_python_blocks():
    blocks = _python_blocks()
    assert len(blocks) >= 3, blocks
    assert any("Client(\"127.0.0.1:8001\")" in block for block in blocks)


def test_readme_python_snippets_run(request):
    """Every ```python block of README.md runs as pasted, in a folder holding photos/a.jpg and
    photos/b.png, against the session's server in place of 127.0.0.1:8001."""
    where = request.getfixturevalue("snippet_dir")
    url = request.getfixturevalue("triton").server.grpc_url
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    for i, block in enumerate(_python_blocks()):
        r = subprocess.run([sys.executable, "-c", block.replace("127.0.0.1:8001", url)],
                           cwd=where, capture_output=True, text=True, timeout=300, env=env)
        assert r.returncode == 0, f"README python block {i + 1}:\n{block}\n{r.stderr[-3000:]}"
