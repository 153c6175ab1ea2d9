"""The commands the README and scripts/demo.sh hand a new user work as pasted: the venv's
python, a local tritonserver bound to 127.0.0.1, and a next step after the demo."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = ("--grpc-address 127.0.0.1", "--http-address 127.0.0.1", "--metrics-address 127.0.0.1")


def _commands(text: str) -> list[str]:
    """Command lines, continuation lines joined."""
    return [line.strip() for line in text.replace("\\\n", " ").splitlines() if line.strip()]


def test_readme_runs_the_projects_scripts_with_the_venvs_python():
    readme = (ROOT / "README.md").read_text()
    bare = re.findall(r"(?<![/\w])python (?:benchmarks|client)/\w+\.py", readme)
    assert not bare, f"outside the venv these fail: {bare}"


def test_local_tritonserver_commands_bind_loopback():
    pasted = [line for line in _commands((ROOT / "README.md").read_text())
              + _commands((ROOT / "scripts" / "demo.sh").read_text())
              if re.match(r"(\.venv/bin/)?tritonserver --model-repository runs/", line)]
    assert len(pasted) >= 2, pasted
    for line in pasted:
        assert all(flag in line for flag in LOOPBACK), line


def test_demo_ends_with_the_next_command_for_your_own_folder(tmp_path):
    """demo.sh's last output: the server and sscd-embed on a folder of one's own."""
    script = (ROOT / "scripts" / "demo.sh").read_text()
    tail = script[script.index("export/serve_check.py"):]  # after the demo itself
    printed = subprocess.run(["bash", "-c", tail.split("\n", 1)[1]], capture_output=True,
                             text=True, timeout=30, cwd=tmp_path)
    assert printed.returncode == 0, printed.stderr
    lines = printed.stdout.strip().splitlines()
    assert lines[0].startswith("Next, your own photographs")
    assert any(line.strip().startswith(".venv/bin/sscd-embed ~/photos --output ")
               for line in lines), lines
