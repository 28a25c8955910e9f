"""The code blocks of README.md and docs/*.md run as documented (convention: docs/README.md).

Every fenced block names its language. A shell (`sh`, `bash`, `shell`, `console`) or Python
(`python`, `py`) block is either `runnable` (this test runs it) or `not-runnable: <reason>` (it cannot run here: a
GPU, Kubernetes, a tool that is not installed...), so that no command is skipped silently:

    ```sh runnable                     bash -euo pipefail; must exit 0
    ```sh runnable exit=1              must exit 1
    ```sh runnable teardown            runs after all the others, even when one failed
    ```sh runnable timeout=400         seconds (default 300)
    ```python runnable                 the venv's python
    ```sh not-runnable: needs a GPU    never run; the reason is required

The runnable blocks of README.md, then of docs/*.md (by name), run in that order as one session:
one HERD_HOME (a temporary directory) for all of them, so a cluster that a README block starts with
`herd up` serves the blocks after it; each block in a fresh temporary working directory, with the
venv's bin first on PATH. The teardown blocks (`herd down`) run last, whatever happened before, and
a cluster still recorded in HERD_HOME after them is stopped and reported.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
SHELLS = {"sh", "bash", "shell", "console"}
PYTHONS = {"python", "py"}
MARKED = SHELLS | PYTHONS  # languages whose blocks must say whether they run
DEFAULT_TIMEOUT_S = 300.0
FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
PORT_FLAG = re.compile(r"--(?:ray-|http-|grpc-|dashboard-|metrics-|redis-)?port[ =](\d+)")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    lang: str
    marker: str  # the info string after the language
    text: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def runnable(self) -> bool:
        return self.marker.split(" ", 1)[0] == "runnable"

    @property
    def options(self) -> dict[str, str]:
        """`exit=1 teardown timeout=60` -> {"exit": "1", "teardown": "", "timeout": "60"}."""
        return dict((word.split("=", 1) + [""])[:2] for word in self.marker.split()[1:]) if self.runnable else {}

    @property
    def expected_exit(self) -> int:
        return int(self.options.get("exit", 0))

    @property
    def teardown(self) -> bool:
        return "teardown" in self.options

    @property
    def timeout_s(self) -> float:
        return float(self.options.get("timeout", DEFAULT_TIMEOUT_S))


def parse_blocks(path: Path, text: str | None = None) -> list[Block]:
    """The fenced code blocks of a Markdown file (CommonMark fences, up to 3 spaces of indent)."""
    lines = (path.read_text() if text is None else text).splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            if re.match(r" {0,3}```.*`", lines[i]):
                raise ValueError(f"{path}:{i + 1}: a ``` fence's info string cannot hold a backtick "
                                 "(so the line opens no code block)")
            i += 1
            continue
        fence, indent, start = m["fence"], len(m["indent"]), i
        body = []
        i += 1
        while i < len(lines) and not re.fullmatch(rf" {{0,3}}{fence[0]}{{{len(fence)},}}\s*", lines[i]):
            line = lines[i]
            body.append(line[min(indent, len(line) - len(line.lstrip(" "))):])
            i += 1
        if i == len(lines):
            raise ValueError(f"{path}:{start + 1}: code block never closed")
        info = m["info"].strip()
        lang, _, marker = info.partition(" ")
        blocks.append(Block(path, start + 1, lang, marker.strip(), "\n".join(body) + "\n"))
        i += 1
    return blocks


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def all_blocks() -> list[Block]:
    return [b for path in doc_files() for b in parse_blocks(path)]


def convention_errors(block: Block) -> list[str]:
    """What is wrong with a block's info string (empty when it follows the convention)."""
    if not block.lang:
        return [f"{block.where}: a code block without a language (write ```text for output or diagrams)"]
    first = block.marker.split(" ", 1)[0]
    if block.lang not in MARKED:
        return [f"{block.where}: only sh/python blocks run; ```{block.lang} must not be marked {first}"] \
            if first.startswith(("runnable", "not-runnable")) else []
    if first.startswith("not-runnable"):
        reason = block.marker.partition(":")[2].strip()
        if not block.marker.startswith("not-runnable:") or not reason:
            return [f"{block.where}: write `not-runnable: <why it cannot run here>`"]
        return []
    if first != "runnable":
        return [f"{block.where}: a ```{block.lang} block must be `runnable` or `not-runnable: <reason>`"]
    if block.lang == "console":
        return [f"{block.where}: write runnable shell blocks as ```sh (a console block holds prompts and output)"]
    errors = []
    for key, value in block.options.items():
        if key == "exit" and not value.isdigit() or key == "timeout" and not value.replace(".", "", 1).isdigit():
            errors.append(f"{block.where}: {key}={value!r} is not a number")
        elif key not in ("exit", "timeout", "teardown") or key == "teardown" and value:
            errors.append(f"{block.where}: unknown option {key!r} (exit=N, timeout=S, teardown)")
    return errors


# ---- the convention ------------------------------------------------------------------------------

def test_every_shell_and_python_block_says_whether_it_runs():
    errors = [e for b in all_blocks() for e in convention_errors(b)]
    assert not errors, "\n".join(errors)
    assert any(b.runnable for b in all_blocks())


def test_the_parser_reads_the_convention():
    text = ("intro\n```sh runnable exit=3 timeout=60\nherd status\n```\n"
            "  ```python not-runnable: needs a GPU\n  import torch\n  ```\n"
            "```text\nout\n```\n```sh runnable teardown\nherd down\n```\n"
            "```sh\nls\n```\n```sh not-runnable:\nls\n```\n```sh runnable exit=x\nls\n```\n````\n```\n````\n")
    blocks = parse_blocks(ROOT / "example.md", text)
    assert [b.lang for b in blocks] == ["sh", "python", "text", "sh", "sh", "sh", "sh", ""]
    first, second, _, down = blocks[:4]
    assert first.runnable and first.expected_exit == 3 and first.timeout_s == 60 and not first.teardown
    assert first.text == "herd status\n" and first.line == 2
    assert not second.runnable and second.text == "import torch\n"
    assert down.teardown and down.expected_exit == 0 and down.timeout_s == DEFAULT_TIMEOUT_S
    assert blocks[-1].text == "```\n"  # a longer fence holds a shorter one
    assert [bool(convention_errors(b)) for b in blocks] == [False, False, False, False, True, True, True, True]


# ---- the monitoring config and the names the docs use --------------------------------------------

def test_the_shipped_prometheus_config_scrapes_the_metrics_port():
    from cluster.launcher import Ports

    config = yaml.safe_load((ROOT / "cluster/monitoring/prometheus.yml").read_text())
    assert set(config) <= {"global", "scrape_configs", "rule_files", "alerting"}
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "herd"
    assert job.get("metrics_path", "/metrics") == "/metrics"
    (static,) = job["static_configs"]
    assert static["targets"] == [f"127.0.0.1:{Ports().metrics}"]  # the port `herd up` exports on
    for key in ("scrape_interval", "evaluation_interval"):
        assert re.fullmatch(r"\d+[smh]", config.get("global", {}).get(key, "15s")), key


def test_operations_names_every_herd_metric_and_no_other():
    source = (ROOT / "deployments/metrics.py").read_text()
    defined = set(re.findall(r'(?:Counter|Gauge|Histogram)\(\s*"(herd_\w+)"', source))
    assert len(defined) > 20
    doc = (ROOT / "docs/OPERATIONS.md").read_text()
    mentioned = {re.sub(r"_(total|bucket|sum|count)$", "", name) for name in re.findall(r"\b(herd_\w+)", doc)}
    assert defined - mentioned == set(), "metrics missing from docs/OPERATIONS.md"
    assert mentioned - defined == set(), "docs/OPERATIONS.md names metrics that deployments/metrics.py lacks"


def test_readme_lists_every_exit_status():
    from cluster import errors

    readme = (ROOT / "README.md").read_text()
    for name in ("EXIT_OK", "EXIT_FAILED", "EXIT_USAGE", "EXIT_UNREACHABLE", "EXIT_BUG", "EXIT_INTERRUPTED"):
        assert re.search(rf"^\| `{getattr(errors, name)}` \|", readme, re.M), name


# ---- running the blocks ----------------------------------------------------------------------------

def _port_in_use(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def run_block(block: Block, env: dict[str, str], workdir: Path) -> tuple[int, str, float]:
    """Run one block in `workdir`: (exit status, its output, seconds)."""
    workdir.mkdir(parents=True)
    python = block.lang in PYTHONS
    script = workdir / ("block.py" if python else "block.sh")
    script.write_text(block.text)
    cmd = [str(VENV_BIN / "python"), script.name] if python else ["bash", "-euo", "pipefail", script.name]
    start = time.monotonic()
    # a session of its own, so that a block that times out is stopped with everything it started
    # (`herd up` starts its Ray head in a session of its own: the teardown's `herd down` stops that)
    proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=block.timeout_s)
        return proc.returncode, output, time.monotonic() - start
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        return -1, output + f"\n(timed out after {block.timeout_s:g} s)", time.monotonic() - start


@pytest.mark.slow
def test_runnable_blocks_run(tmp_path):
    blocks = [b for b in all_blocks() if b.runnable]
    busy = sorted({int(p) for b in blocks for p in PORT_FLAG.findall(b.text) if _port_in_use(int(p))})
    assert not busy, f"ports the docs use are taken: {busy} (a cluster left running? `herd down` it)"
    home = tmp_path / "herd-home"
    # PYTHONPATH: this checkout, whichever one the venv's editable install points at
    env = {**os.environ, "HERD_HOME": str(home), "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    failures, timings = [], []

    def run(i: int, block: Block) -> None:
        code, output, seconds = run_block(block, env, tmp_path / f"block-{i:02d}")
        timings.append(f"{seconds:6.1f} s  {block.where} ({block.lang} {block.marker})")
        if keep := os.environ.get("HERD_DOCS_OUTPUT"):  # a folder to keep every block's output in
            name = f"{i:02d}-{block.where.replace('/', '-').replace(':', '-')}.txt"
            Path(keep).mkdir(parents=True, exist_ok=True)
            (Path(keep) / name).write_text(f"{block.text}--- exit {code} ---\n{output}")
        if code != block.expected_exit:
            failures.append(f"{block.where}: exit {code}, documented {block.expected_exit}\n"
                            f"--- block ---\n{block.text}--- output (end) ---\n{output[-4000:]}")

    try:
        for i, block in enumerate(blocks):
            if not block.teardown:
                run(i, block)
    finally:
        for i, block in enumerate(blocks):
            if block.teardown:
                run(i, block)
        print("\n".join(timings))
        if (home / "up.json").is_file():  # the teardown blocks did not stop it: stop it here
            subprocess.run([str(VENV_BIN / "herd"), "down"], env=env, capture_output=True, timeout=120)
            failures.append("the teardown blocks left a herd cluster running (stopped by the test)")
    assert not failures, "\n\n".join(failures)
