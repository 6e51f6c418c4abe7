"""24 clients at once, each with its own image and reason, a third of them sampling, half of them
streaming, through a server with 4 cache rows: each gets exactly its own text (greedy: infer.py's
single-image path, one by one; sampled: the same request sent alone), none is lost or duplicated,
and the queue and the rows drain to 0."""

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from _infer_fixtures import shared_tiny_release, write_images
from _serve_fixtures import NEW, chat_body, shared_server, sse_text

from infer import describe
from llavarad.infer.images import load_image
from llavarad.model.weights import load_llavarad

CLIENTS = 24
REASONS = [None, "Cough.", "Fever and chills.\nRule out pneumonia.", "Chest pain.", "", "Évaluer l'épanchement pleural.",
           "Line placement.", "Dyspnea, 3 days."]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tiny = shared_tiny_release(tmp_path_factory)
    folder = tmp_path_factory.mktemp("concurrency")
    images = [folder / name for name in write_images(folder, CLIENTS, seed=7)]
    bodies = []
    for i, image in enumerate(images):
        sampling = {"temperature": 0.9, "top_p": 0.9, "seed": 100 + i} if i % 3 == 2 else {}
        bodies.append(chat_body(image, REASONS[i % len(REASONS)], max_tokens=NEW + i % 5, stream=i % 2 == 1, **sampling))
    return tiny, images, bodies


def ask(url: str, body: dict) -> tuple[str, str]:
    """(id, content) of one request, streamed or not."""
    if body["stream"]:
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
            assert r.status_code == 200
            text, chunks, lines = sse_text(r)
            assert lines[-1] == "[DONE]"
            return chunks[0]["id"], text
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["id"], r.json()["choices"][0]["message"]["content"]


def metrics(url: str) -> dict[str, float]:
    return {line.split()[0]: float(line.split()[1]) for line in httpx.get(url + "/metrics").text.splitlines() if line and not line.startswith("#")}


def test_24_clients_through_4_rows(setup):
    tiny, images, bodies = setup
    server = shared_server(tiny)
    model, tokenizer = load_llavarad(str(tiny.release), str(tiny.base), torch.float32, "cpu")
    expected = {}
    for i, (image, body) in enumerate(zip(images, bodies)):
        reason = REASONS[i % len(REASONS)] or None  # an empty text part is the no-reason prompt
        if "seed" not in body:
            expected[i] = describe(model, tokenizer, [load_image(str(image))], [reason], body["max_tokens"])[0]
        else:
            expected[i] = ask(server.url, body)[1]  # alone, before the crowd
    before = metrics(server.url)
    with ThreadPoolExecutor(CLIENTS) as pool:
        answers = list(pool.map(lambda b: ask(server.url, b), bodies))
    assert {i: text for i, (_, text) in enumerate(answers)} == expected
    assert len({id_ for id_, _ in answers}) == CLIENTS  # one answer per request, none shared
    assert len(set(expected.values())) > CLIENTS // 2  # the texts differ: a swap would show
    after = metrics(server.url)
    assert after["llavarad_queue_length"] == 0 and after["llavarad_active_rows"] == 0
    assert after['llavarad_requests_total{outcome="ok"}'] - before['llavarad_requests_total{outcome="ok"}'] == CLIENTS
