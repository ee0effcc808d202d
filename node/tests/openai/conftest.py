"""Starts a real `hypha up` on a free port for the openai-client suite.

The binary is target/debug/hypha (built by `cargo test`), or $HYPHA_BIN.
The model is the cached default model, or $HYPHA_TEST_MODEL.
"""
import os
import pathlib
import socket
import subprocess
import time
import urllib.request

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[3]


def _model() -> str:
    if os.environ.get("HYPHA_TEST_MODEL"):
        return os.environ["HYPHA_TEST_MODEL"]
    cache = os.environ.get("HYPHA_MODELS_DIR") or os.path.expanduser("~/.cache/hypha/models")
    path = os.path.join(cache, "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert os.path.isfile(path), f"test model missing at {path}: run .ci/run"
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(proc, url, log_name):
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=1).read()
            return
        except OSError:
            assert proc.poll() is None, f"hypha up exited; see target/{log_name}"
            assert time.time() < deadline, "hypha up did not become ready"
            time.sleep(0.1)


def _start(args, log_name):
    """`hypha up` with `args` on a free HTTP port: the process and its base URL."""
    binary = os.environ.get("HYPHA_BIN", str(ROOT / "target" / "debug" / "hypha"))
    assert os.path.isfile(binary), f"{binary} missing: run cargo test first"
    port = _free_port()
    log = open(ROOT / "target" / log_name, "w")
    proc = subprocess.Popen(
        [binary, "up", "--http", f"127.0.0.1:{port}", *args],
        stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    _wait_healthy(proc, url, log_name)
    return proc, url, log


def _stop(proc, log):
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


@pytest.fixture(scope="session")
def node(tmp_path_factory):
    """A seeder: the test model, QUIC on loopback for the consumer."""
    data = tmp_path_factory.mktemp("seeder")
    proc, url, log = _start(
        ["--model", _model(), "--quic", "127.0.0.1:0", "--data-dir", str(data),
         "--threads", "1", "--parallel", "8", "--ctx-size", "1024", "--embeddings"],
        "openai-suite-node.log",
    )
    yield url
    _stop(proc, log)


def _peer_address(log_name):
    deadline = time.time() + 30
    marker = "peers reach this node as"
    while time.time() < deadline:
        for line in (ROOT / "target" / log_name).read_text().splitlines():
            if marker in line:
                return line.split(marker, 1)[1].strip()
        time.sleep(0.1)
    raise AssertionError(f"no {marker!r} line in target/{log_name}")


@pytest.fixture(scope="session")
def consumer(node, tmp_path_factory):
    """A node with no model that reaches the seeder over QUIC."""
    data = tmp_path_factory.mktemp("consumer")
    proc, url, log = _start(
        ["--peer", _peer_address("openai-suite-node.log"), "--data-dir", str(data)],
        "openai-suite-consumer.log",
    )
    yield url
    _stop(proc, log)


@pytest.fixture(params=["local", "network"])
def base(request):
    """The seeder's own API, then the consumer's, which routes to the seeder."""
    return request.getfixturevalue("node" if request.param == "local" else "consumer")


@pytest.fixture(scope="session")
def client(node):
    from openai import OpenAI
    return OpenAI(base_url=node + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def model(client):
    return client.models.list().data[0].id
