"""RemoteReward against stub servers (retries, time-outs, bad answers) and the real ``serve-reward``."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import lightning as L
import pytest
import torch

from lit_rlhf import PPOModule
from lit_rlhf.rewards import RemoteReward, RewardBatch, RewardError, RewardModel, score_components
from tests.helpers import datamodule, small_module, trainer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Stub:
    """A local HTTP server whose handler answers from ``respond(payload, call)`` (status, body)."""

    def __init__(self, respond):
        self.payloads, self.respond = [], respond
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                payload = json.loads(self.rfile.read(int(self.headers["content-length"])))
                stub.payloads.append(payload)
                status, body = stub.respond(payload, len(stub.payloads))
                if status is None:  # never answer (the client must time out)
                    time.sleep(3)
                    return
                data = json.dumps(body).encode() if not isinstance(body, bytes) else body
                self.send_response(status)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/predict"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub():
    servers = []

    def start(respond):
        servers.append(Stub(respond))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def lengths(payload):
    return [float(len(r)) for r in payload["responses"]]


BATCH = RewardBatch(["p0", "p1", "p2", "p3", "p4"], ["a", "bb", "ccc", "dddd", "e"], {"answer": [1, 2, 3, 4, 5]})


def test_rows_go_in_batches_with_their_columns(stub):
    server = stub(lambda payload, call: (200, {"rewards": lengths(payload)}))
    scores = score_components([RemoteReward(server.url, batch_size=2)], BATCH)["remote"]
    assert scores.tolist() == [1.0, 2.0, 3.0, 4.0, 1.0]
    assert sorted(len(p["prompts"]) for p in server.payloads) == [1, 2, 2]
    first = next(p for p in server.payloads if p["prompts"][0] == "p0")
    assert first == {"prompts": ["p0", "p1"], "responses": ["a", "bb"], "columns": {"answer": [1, 2]}}


def test_server_errors_are_retried_with_backoff(stub):
    server = stub(
        lambda payload, call: (503, {"detail": "busy"}) if call <= 2 else (200, {"rewards": lengths(payload)})
    )
    scores = score_components([RemoteReward(server.url, max_retries=2, batch_size=8)], BATCH)["remote"]
    assert scores.tolist() == [1.0, 2.0, 3.0, 4.0, 1.0] and len(server.payloads) == 3


@pytest.mark.parametrize(
    "respond,message",
    [
        (lambda p, c: (500, {"detail": "oops"}), "reward judge: .*{url} failed after 2 tries; last error: HTTP 500"),
        (lambda p, c: (None, None), "reward judge gave no scores within its timeout_s=0.5 s \\({url} had not answered"),
        (lambda p, c: (404, {"detail": "no"}), "reward judge: .*{url}.*answered HTTP 404"),
        (lambda p, c: (200, {"scores": [1]}), 'reward judge: .*{url}.*expected {{"rewards": \\[...\\]}}'),
        (lambda p, c: (200, {"rewards": [1.0]}), "reward judge: .*{url}.*expected a list of 5 rewards"),
        (lambda p, c: (200, b"not json"), "reward judge: .*{url}.*answered b?'not json'"),
    ],
)
def test_failures_name_the_url(stub, respond, message):
    server = stub(respond)
    # 0.5 s bounds the whole call: a server that never answers is cut there; a quick 500 is retried within it
    timeout_s = 0.5 if respond(None, 0)[0] is None else 5.0
    component = RemoteReward(server.url, max_retries=1, timeout_s=timeout_s, batch_size=8, name="judge")
    with pytest.raises(RewardError, match=message.format(url=server.url)):
        score_components([component], BATCH)


def test_no_server_at_all_is_named_after_the_retries():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    url = f"http://127.0.0.1:{port}/predict"
    with pytest.raises(RewardError, match=f"{url} failed after 3 tries; last error: ConnectError"):
        score_components([RemoteReward(url, max_retries=2)], BATCH)


# --- the real server ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: list[str]) -> tuple[subprocess.Popen, str]:
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
                    return process, f"http://127.0.0.1:{port}/predict"
        except OSError:
            time.sleep(0.5)
    stop(process)
    raise AssertionError("serve-reward did not become healthy within 120 s")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, 9)
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def reward_server(tiny_assets):
    process, url = start_server(["--reward_path", tiny_assets["reward"]])
    yield url
    stop(process)


def fit(tmp_path, module, epochs, callbacks=()):
    L.seed_everything(0, verbose=False)
    t = trainer(tmp_path, epochs, callbacks)
    t.fit(module, datamodule=datamodule(module.assets))
    return module


def module_with(tiny_assets, reward):
    # pad and bos never appear inside a response (decoded text would drop them)
    generation = {"max_new_tokens": 4, "suppress_token_ids": (0, 1)}
    models = {"actor_path": tiny_assets["policy"], "critic_path": tiny_assets["reward"]}
    module = small_module(tiny_assets, PPOModule, rewards=[reward], generation=generation, models=models)
    module.assets = tiny_assets
    return module


@pytest.mark.slow
def test_served_reward_model_gives_the_in_process_scores(tiny_assets, reward_server, tmp_path):
    local = fit(tmp_path / "local", module_with(tiny_assets, RewardModel(tiny_assets["reward"])), 2)
    remote = fit(tmp_path / "remote", module_with(tiny_assets, RemoteReward(reward_server, batch_size=5)), 2)
    a, b = local.buffer.experience, remote.buffer.experience
    assert torch.equal(a.sequences, b.sequences), "same seed, same policy updates: the same rollout"
    assert not torch.all(a.loss_mask), "some responses are cut: the EOS handling must agree too"
    torch.testing.assert_close(b.scores, a.scores, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_a_served_reward_function_and_bad_requests(tiny_assets, tmp_path):
    process, url = start_server(["--reward_fn", "tests.rewards.test_remote.lengths_reward"])
    try:
        scores = score_components([RemoteReward(url)], BATCH)["remote"]
        assert scores.tolist() == [1.0, 2.0, 3.0, 4.0, 1.0]
        body = json.dumps({"prompts": [1], "responses": ["a"]}).encode()
        request = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(request, timeout=10)
        assert answer.value.code == 400 and b"prompts must be a list of strings" in answer.value.read()
    finally:
        stop(process)


def lengths_reward(prompts, responses):
    return [float(len(r)) for r in responses]


class KillAfterFirstRollout(L.Callback):
    def __init__(self, process):
        self.process = process

    def on_train_epoch_end(self, trainer, module):
        stop(self.process)


@pytest.mark.slow
def test_a_server_killed_mid_run_stops_it_with_the_url(tiny_assets, tmp_path):
    process, url = start_server(["--reward_path", tiny_assets["reward"]])
    try:
        module = module_with(tiny_assets, RemoteReward(url, max_retries=1, timeout_s=5))
        with pytest.raises(RewardError, match=f"reward remote: {url} failed after 2 tries; last error: ConnectError"):
            fit(tmp_path, module, 3, [KillAfterFirstRollout(process)])
        assert module.current_epoch == 1, "the first rollout was scored; the second found no server"
    finally:
        stop(process)


def trickling_server() -> tuple[str, threading.Event]:
    """A loopback server that answers one request a byte every 0.5 s (for at most 10 s, then closes)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    done = threading.Event()

    def serve():
        try:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(10)
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n")
                for _ in range(20):
                    if done.wait(0.5):
                        break
                    conn.sendall(b" ")
        except OSError:
            pass  # the client hung up: the point of the test
        finally:
            listener.close()

    threading.Thread(target=serve, daemon=True).start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}/predict", done


def test_timeout_s_bounds_the_whole_answer_of_a_trickling_server():
    url, done = trickling_server()
    start = time.monotonic()
    try:
        with pytest.raises(RewardError, match=f"reward remote gave no scores within its timeout_s=1 s \\({url}"):
            score_components([RemoteReward(url, timeout_s=1)], BATCH)
        assert time.monotonic() - start < 3.0, "each byte came within the read time-out; the whole call must not"
    finally:
        done.set()


def test_a_failing_remote_reward_shows_no_unrelated_event_loop_error(capsys, caplog):
    import traceback

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/predict"  # nothing listens there
    with pytest.raises(RewardError, match=f"{url} failed after 1 tries") as raised:
        score_components([RemoteReward(url, max_retries=0)], BATCH)
    printed = "".join(traceback.format_exception(raised.value))
    captured = capsys.readouterr()
    for text in (printed, captured.out, captured.err, caplog.text):
        assert "no running event loop" not in text
