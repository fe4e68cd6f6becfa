"""The code-execution reward's sandbox against hostile completions: each ends as 0 (or no reward when
the sandbox cannot start) within its limits, the host and this (the training) process unharmed, and a
good program still passes afterwards."""

import os
import socket
import time

import pytest

from stages.core import sandbox
from stages.core.config import SandboxConfig

LIMITS = SandboxConfig(cpu_seconds=2, wall_seconds=5, memory_mb=256, file_mb=1, processes=16)
PASSES = ("def f(x):\n    return x + 1\n", "assert f(1) == 2\n")


def sandboxed() -> int:
    """Processes of sandboxed code on this machine: each started as `python -I -S -B -c …`, and a fork
    keeps its parent's command line (counting every process would count whatever else the machine runs)."""
    n = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            n += b"\0-I\0-S\0-B\0-c\0" in open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:  # ended meanwhile
            pass
    return n


@pytest.fixture
def guarded():
    """Runs a hostile program; checks it took no longer than its limits, left no process and no
    scratch directory behind, and that a good program still passes after it."""
    import tempfile

    tmp = tempfile.gettempdir()
    before = sandboxed(), {p for p in os.listdir(tmp) if p.startswith("alignpipe-sandbox-")}

    def run(code: str, tests: str = "") -> float | None:
        t0 = time.perf_counter()
        result = sandbox.run_tests(code, tests, LIMITS)
        assert time.perf_counter() - t0 < LIMITS.wall_seconds + 3
        time.sleep(0.2)
        assert sandboxed() <= before[0]  # nothing the code forked lives on
        assert {p for p in os.listdir(tmp) if p.startswith("alignpipe-sandbox-")} == before[1]
        assert sandbox.run_tests(*PASSES, LIMITS) == 1.0  # the run goes on
        return result

    return run


def test_a_passing_and_a_failing_program():
    assert sandbox.run_tests(*PASSES, LIMITS) == 1.0
    assert sandbox.run_tests("def f(x):\n    return x\n", "assert f(1) == 2\n", LIMITS) == 0.0
    assert sandbox.run_tests("def f(x) return", "assert f(1) == 2\n", LIMITS) == 0.0  # a syntax error


def test_this_machine_confines_the_code():
    """What the hostile tests rely on (Linux ≥ 6.12 for Landlock's signal scope, unprivileged namespaces, a
    writable pids cgroup); a machine without them runs the code with less isolation, and says so."""
    iso = sandbox.isolation()
    assert iso.landlock >= 6 and iso.namespaces and iso.process_limit, iso.describe()


@pytest.mark.parametrize("name, code", [
    ("infinite loop", "while True:\n    pass\n"),
    ("sleeping forever", "import time\ntime.sleep(3600)\n"),
    ("fork bomb", "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"),
    ("memory bomb", "chunks = []\nwhile True:\n    chunks.append(bytearray(10 ** 7))\n"),
    ("1 GB write", "with open('big', 'wb') as fh:\n    for _ in range(1024):\n        fh.write(b'0' * (1 << 20))\n"),
    ("ctypes crash", "import ctypes\nctypes.string_at(0)\n"),
    ("exit 0 before the tests", "import os\nos._exit(0)\n"),
    ("sys.exit(0) before the tests", "import sys\nsys.exit(0)\n"),
    ("printing a pass", "print('ok')\nimport os\nos._exit(0)\n"),
])
def test_hostile_code_scores_zero(guarded, name, code):
    """Each would pass if the sandbox let it: the tests below call f, which the code never defines."""
    assert guarded(code, "assert f(1) == 2\n") == 0.0


def test_no_network(guarded):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.1)
    port = server.getsockname()[1]
    code = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\ns.sendall(b'x')\n"
    assert guarded(code) == 0.0
    with pytest.raises(socket.timeout):
        server.accept()  # nothing reached the host's listener
    server.close()


def test_no_file_outside_its_scratch_dir(guarded, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("the host's data")
    secret.chmod(0o644)
    assert guarded(f"data = open({str(secret)!r}).read()\nassert data == \"the host's data\"\n") == 0.0
    assert guarded("import os\nassert os.listdir('/etc')\n") == 0.0
    assert guarded(f"open({str(tmp_path / 'planted')!r}, 'w').write('x')\n") == 0.0
    assert not (tmp_path / "planted").exists()


def test_cannot_signal_the_training_process(guarded):
    """Each would kill this test process (or, for kill(-1), every process this user may signal) if it got
    through; the code exits right after, so a pass would also mean the signal did nothing."""
    me = os.getpid()
    for code in (f"import os, signal\nos.kill({me}, signal.SIGKILL)\n", "import os, signal\nos.kill(os.getppid(), 9)\n",
                 f"import os\nos.killpg(os.getpgid({me}), 9)\n", "import os\nos.kill(-1, 9)\n"):
        assert guarded(code) == 0.0, code


def test_a_sandbox_that_cannot_start_gives_no_reward(monkeypatch):
    def broken(*_):
        def setup():
            raise OSError("no namespaces here")
        return setup

    monkeypatch.setattr(sandbox, "_child_setup", broken)
    assert sandbox.run_tests(*PASSES, LIMITS) is None


def test_the_program_is_the_completions_code_block():
    assert sandbox.extract_code("Here:\n```python\ndef f(x):\n    return x\n```\nDone.") == "def f(x):\n    return x\n"
    assert sandbox.extract_code("def f(x): return x") == "def f(x): return x"


@pytest.mark.smoke
def test_the_embedded_code_task_end_to_end(tmp_path):
    """python_functions through prepare → sft → pairs → align@grpo with the code reward alone: the
    tiny model's programs run in the sandbox, right ones score 1, wrong ones 0, none goes unscored."""
    import json

    from tests import helpers
    from tests.test_stages import smoke_params

    d = tmp_path
    smoke_params(d / "params.yaml", **{"data.embedded.task": "python_functions", "sft.steps": 200,
                                       "pairs.score": {"code": 1.0}, "pairs.max_new_tokens": 24,
                                       "align.grpo.reward": {"code": 1.0}, "align.grpo.max_new_tokens": 24})
    helpers.stage("prepare", "--data-out", "data", "--model-out", "models/base", cwd=d)
    prompt = json.loads((d / "data" / "prompts.jsonl").read_text().splitlines()[0])
    assert prompt["tests"].startswith("assert f(") and prompt["answer"].startswith("def f(x): return x+")
    helpers.stage("sft", "--train", "data/sft.jsonl", "--probe", "data/prompts.jsonl", "--base", "models/base",
                  "--out", "models/sft", "--metrics", "sft.json", "--plots", "sft.csv", cwd=d)
    helpers.stage("pairs", "--prompts", "data/prompts.jsonl", "--sft", "models/sft", "--reward", "none",
                  "--out", "pairs", "--metrics", "pairs.json", cwd=d)
    samples = [json.loads(x) for x in (d / "pairs" / "samples.jsonl").read_text().splitlines()]
    by_score = {s["score"] for s in samples}
    assert by_score == {0.0, 1.0}, by_score  # some programs pass their tests, some do not; none unscored
    for s in samples:  # a program that passes is one the exact-match verifier accepts, or an equivalent one
        if s["verifier"] == 1.0:
            assert s["score"] == 1.0
    helpers.stage("align", "grpo", "--pairs", "pairs", "--prompts", "data/prompts.jsonl", "--sft", "models/sft",
                  "--reward", "none", "--out", "models/grpo", "--metrics", "grpo.json", "--plots", "grpo.csv", cwd=d)
    m = json.loads((d / "grpo.json").read_text())
    assert m["rollout/no_reward"] == 0


def test_code_reward_in_the_reward_interface():
    from stages.core import config, rewards

    out = rewards.code_reward(["def f(x): return x+3", "```python\ndef f(x):\n    return x\n```", "whatever"],
                              tests=["assert f(1) == 4\n", "assert f(1) == 4\n", None],
                              sandbox_limits=config.SandboxConfig(workers=2))
    assert out == [1.0, 0.0, None]  # a row without tests gets no reward, not 0
