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


@pytest.fixture(scope="session")
def node():
    binary = os.environ.get("HYPHA_BIN", str(ROOT / "target" / "debug" / "hypha"))
    assert os.path.isfile(binary), f"{binary} missing: run cargo test first"
    port = _free_port()
    log = open(ROOT / "target" / "openai-suite-node.log", "w")
    proc = subprocess.Popen(
        [binary, "up", "--model", _model(), "--http", f"127.0.0.1:{port}",
         "--threads", "1", "--parallel", "8", "--ctx-size", "1024"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=1).read()
            break
        except OSError:
            assert proc.poll() is None, "hypha up exited; see target/openai-suite-node.log"
            assert time.time() < deadline, "hypha up did not become ready"
            time.sleep(0.1)
    yield url
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


@pytest.fixture(scope="session")
def client(node):
    from openai import OpenAI
    return OpenAI(base_url=node + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def model(client):
    return client.models.list().data[0].id
