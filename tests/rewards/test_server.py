"""``lit-rlhf serve-reward`` as a user runs it: a real process on a loopback port, stopped by signals.

Each server is a subprocess in its own session, so a test that fails still kills everything the
server started (``os.killpg``) and never leaves a process serving on the machine.
"""

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: list[str]) -> tuple[subprocess.Popen, int]:
    """``serve-reward args`` on a free port, once ``/health`` answers ``ok`` (within 120 s)."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT}
    process = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "train.py"), "serve-reward", *args, "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"serve-reward exited {process.returncode}: {process.stderr.read()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
                if answer.read() == b"ok":
                    return process, port
        except OSError:
            time.sleep(0.3)
    kill_all(process)
    raise AssertionError("serve-reward did not become healthy within 120 s")


def kill_all(process: subprocess.Popen) -> None:
    """SIGKILL the server's whole session (its children included), whatever state it is in."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    print(f"serve-reward exited {process.returncode}; its stderr ends:\n{process.stderr.read()[-3000:]}")


def refuses(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) != 0


def lengths_reward(prompts, responses):
    return [float(len(r)) for r in responses]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_the_command_stops_every_process_and_frees_the_port(sig):
    process, port = start_server(["--reward_fn", "tests.rewards.test_server.lengths_reward"])
    try:
        children = psutil.Process(process.pid).children(recursive=True)
        assert children, "LitServe serves from child processes (inference worker, uvicorn, manager)"
        process.send_signal(sig)  # to the parent only, as `kill <pid>` does
        deadline = time.time() + 30  # a liveness bound: the suite's other worker may hold both cores
        while time.time() < deadline and not refuses(port):
            time.sleep(0.1)
        assert refuses(port), f"port {port} still accepts connections 30 s after {sig.name}"
        _, alive = psutil.wait_procs(children, timeout=max(deadline - time.time(), 1))
        assert not alive, f"children still running after {sig.name}: {[(p.pid, p.name()) for p in alive]}"
        assert process.wait(timeout=5) is not None
    finally:
        kill_all(process)


@pytest.fixture(scope="module")
def reward_model_port(tiny_assets):
    process, port = start_server(["--reward_path", tiny_assets["reward"], "--batch_timeout", "0.5"])
    yield port
    kill_all(process)


def post(port: int, body: bytes) -> tuple[int, str]:
    """The status and body text of ``POST /predict`` with ``body``."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/predict", data=body, headers={"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=20) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def rows(prompts: list[str], responses: list[str]) -> bytes:
    return json.dumps({"prompts": prompts, "responses": responses}).encode()


@pytest.mark.slow
@pytest.mark.parametrize(
    "body,codes,message",
    [
        (b'{"prompts": ["1+1="], "responses": ["2"', (400, 422), "not valid JSON"),
        (b"", (400, 422), "not valid JSON"),
        (b"[1, 2]", (400, 422), "JSON object"),
        (rows([], []), (400, 422), "no rows"),
        (rows(["1+1="], ["2" * 20_000]), (413, 422), "20005 tokens.*position range of 256"),
    ],
    ids=["truncated-json", "empty-body", "not-an-object", "empty-batch", "too-long"],
)
def test_requests_it_cannot_score_are_4xx_naming_the_problem(reward_model_port, body, codes, message):
    start = time.perf_counter()
    status, text = post(reward_model_port, body)
    assert status in codes, (status, text)
    detail = json.loads(text)["detail"]
    assert isinstance(detail, str) and re.search(message, detail), detail
    assert time.perf_counter() - start < 5, "checked before the model runs"


@pytest.mark.slow
def test_a_refused_request_is_answered_alone_and_the_server_keeps_scoring(reward_model_port):
    bodies = [rows(["1+1="], ["2" * 20_000]), rows(["1+1=", "2+2="], ["2", "4"])]
    with ThreadPoolExecutor(2) as pool:  # sent together: LitServe batches them (--batch_timeout 0.5)
        (refused, _), (status, text) = pool.map(lambda body: post(reward_model_port, body), bodies)
    assert refused == 413 and status == 200, (refused, status, text)
    assert len(json.loads(text)["rewards"]) == 2, text
    longest = "2" * (256 - len("1+1=") - 1)  # prompt + response + EOS fill the position range exactly
    status, text = post(reward_model_port, rows(["1+1="], [longest]))
    assert status == 200, text
