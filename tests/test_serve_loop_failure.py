"""When the model fails inside the decode loop, the request in flight gets a 500 in OpenAI's error body,
/health turns 503 and later requests get 503: the server says it is broken instead of hanging. An
exception no route expected is a 500 in OpenAI's error body too, counted in /metrics, one line in the
log and no traceback. In process (starlette's TestClient runs the app's lifespan), on the tiny release."""

import threading

import pytest
import torch
from _infer_fixtures import shared_tiny_release, write_images
from _serve_fixtures import chat_body

from llavarad.model.weights import load_llavarad
from llavarad.serve.app import ServeConfig, Server
from llavarad.serve.prometheus import Metrics
from llavarad.serve.scheduler import Scheduler


def within(seconds: float, call):
    """call() in a daemon thread; fails instead of hanging the test run when it does not return."""
    box = []
    worker = threading.Thread(target=lambda: box.append(call()), daemon=True)
    worker.start()
    worker.join(seconds)
    assert box, f"no answer within {seconds} s"
    return box[0]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tiny = shared_tiny_release(tmp_path_factory)
    folder = tmp_path_factory.mktemp("failure")
    image = folder / write_images(folder, 1)[0]
    model, tokenizer = load_llavarad(str(tiny.release), str(tiny.base), torch.float32, "cpu")
    return model, tokenizer, image


def in_process(model, tokenizer) -> Server:
    metrics = Metrics()
    config = ServeConfig(max_new_tokens=8, max_len=4 + 256 + 8)
    return Server(Scheduler(model, tokenizer.eos_id, 2, config.max_len, 4, metrics), tokenizer, 28, 4, config, metrics)


def test_a_dead_decode_loop_turns_health_to_503(setup, monkeypatch):
    testclient = pytest.importorskip("starlette.testclient")
    model, tokenizer, image = setup

    def broken(pixels):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(model, "encode_images", broken)
    server = in_process(model, tokenizer)
    with testclient.TestClient(server.app) as client:
        assert client.get("/health").status_code == 200
        r = within(60, lambda: client.post("/v1/chat/completions", json=chat_body(image, "Cough.")))
        assert r.status_code == 500
        assert r.json()["error"]["code"] == "server_error" and "illegal memory access" in r.json()["error"]["message"]
        assert client.get("/health").status_code == 503
        again = client.post("/v1/chat/completions", json=chat_body(image, "Cough."))
        assert again.status_code == 503 and again.json()["error"]["code"] == "model_not_ready"
        assert "retry-after" not in again.headers  # a dead decode loop does not come back: no Retry-After


def test_an_unexpected_exception_is_a_500_in_openai_body_counted_without_a_traceback(setup, monkeypatch, capsys):
    testclient = pytest.importorskip("starlette.testclient")
    model, tokenizer, image = setup

    def bug(body, limits):
        raise KeyError("a bug in the server")

    monkeypatch.setattr("llavarad.serve.app.parse_chat", bug)
    with testclient.TestClient(in_process(model, tokenizer).app) as client:
        r = client.post("/v1/chat/completions", json=chat_body(image, "Cough."))
        assert r.status_code == 500, r.text
        assert r.json()["error"]["type"] == "server_error" and "KeyError" in r.json()["error"]["message"]
        assert 'llavarad_requests_total{outcome="server_error"} 1.0' in client.get("/metrics").text
        assert client.get("/v1/nothing-here").json()["error"]["code"] == "not_found"  # and the other errors are JSON too
    log = capsys.readouterr().err
    assert "error: POST /v1/chat/completions: KeyError at test_serve_loop_failure.py:" in log
    assert "Traceback" not in log and "a bug in the server" not in log  # where, not what: a message may quote the request
