"""POST /v1/explain on a real serve.py process: each sentence's text, span and overlay equal what
llavarad.explain.relevance.explain gives for the same image, reason and findings on the same tiny release
(the overlay PNGs decoded and compared pixel for pixel, and each map alone, the grid drawn as a
transparent layer of the image's shape); bad bodies get a 4xx with OpenAI's error
body; explanations asked for while reports are decoding change neither; a server running
int4 explains where its layout unpacks (a CPU with AVX512 or AVX2) and elsewhere refuses with a 400 that says why."""

from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from _infer_fixtures import cpu_without_avx512, shared_tiny_release, write_corrupt, write_images
from _serve_fixtures import ServerProcess, chat_body, data_url, infer_stdout, png_pixels, shared_server

from llavarad.explain.overlay import layer
from llavarad.explain.relevance import explain
from llavarad.infer.images import load_image
from llavarad.model import quant
from llavarad.model.weights import load_llavarad

FINDINGS = "Heart size is normal. No pleural effusion, e.g. on the left. A 1.5 cm nodule"
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py; the server runs one thread too


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tiny = shared_tiny_release(tmp_path_factory)
    folder = tmp_path_factory.mktemp("serve_explain")
    images = [folder / name for name in write_images(folder, 2, seed=5)]
    return tiny, shared_server(tiny), images, folder


def explain_body(image, reason: str | None, findings: str) -> dict:
    return {"image_url": data_url(image), "reason": reason, "findings": findings}


@pytest.mark.parametrize("k,reason", [(0, None), (1, "Shortness of breath.\nEvaluate for pneumonia.")])
def test_overlays_equal_explain_called_directly(setup, k, reason):
    tiny, server, images, _ = setup
    r = httpx.post(server.url + "/v1/explain", json=explain_body(images[k], reason, FINDINGS), timeout=120)
    assert r.status_code == 200, r.text
    answer = r.json()
    model, tokenizer = load_llavarad(str(tiny.release), str(tiny.base), torch.float32, torch.device("cpu"), None)
    expected = explain(model, tokenizer, load_image(str(images[k])), reason, FINDINGS)
    assert answer["object"] == "explanation" and answer["findings"] == expected.findings
    assert [s["text"] for s in answer["sentences"]] == [s.text for s in expected.sentences]
    assert len(expected.sentences) == 3  # the splitter kept "e.g." and "1.5" inside their sentences
    for got, want in zip(answer["sentences"], expected.sentences):
        assert (got["start"], got["end"]) == want.chars and got["text"] == expected.findings[got["start"] : got["end"]]
        assert got["logprob"] == pytest.approx(want.logprob, abs=1e-3)
        np.testing.assert_array_equal(png_pixels(got["overlay"]), png_pixels(want.overlay))
        np.testing.assert_array_equal(png_pixels(got["map"], "RGBA"), np.asarray(layer(want.relevance, *expected.image_size, 28)))


def test_explaining_while_decoding_changes_neither(setup):
    """Explanations run on the decode loop's thread between steps: the reports decoding meanwhile are
    infer.py's, and each explanation is the one it gives alone."""
    tiny, server, images, _ = setup
    alone = httpx.post(server.url + "/v1/explain", json=explain_body(images[0], None, FINDINGS), timeout=120).json()
    with ThreadPoolExecutor(4) as pool:
        chats = [pool.submit(httpx.post, server.url + "/v1/chat/completions", json=chat_body(im, "Cough.", 32), timeout=120) for im in images]
        explains = [pool.submit(httpx.post, server.url + "/v1/explain", json=explain_body(images[0], None, FINDINGS), timeout=120) for _ in range(2)]
        for im, chat in zip(images, chats):
            assert chat.result().json()["choices"][0]["message"]["content"] == infer_stdout(tiny.release, tiny.base, im, "Cough.", 32)
        for e in explains:
            assert e.result().json() == alone


@pytest.mark.parametrize("body,status,code,param", [
    ("not json", 400, "invalid_json", None),
    ({"image_url": "IMAGE"}, 400, "invalid_value", "findings"),
    ({"image_url": "IMAGE", "findings": "  "}, 400, "invalid_value", "findings"),
    ({"image_url": "IMAGE", "findings": "Normal.", "reason": 3}, 400, "invalid_type", "reason"),
    ({"image_url": "https://example.com/x.png", "findings": "Normal."}, 400, "invalid_value", "image_url"),
    ({"image_url": "CORRUPT", "findings": "Normal."}, 400, "invalid_image", "image_url"),
    ({"image_url": "IMAGE", "findings": "Normal. " * 300}, 400, "context_length_exceeded", "findings"),
])
def test_bad_bodies_get_a_4xx_with_the_error_body(setup, body, status, code, param):
    _, server, images, folder = setup
    if isinstance(body, dict):
        urls = {"IMAGE": data_url(images[0]), "CORRUPT": data_url(folder / write_corrupt(folder))}
        body = {**body, "image_url": urls.get(body["image_url"], body["image_url"])}
        r = httpx.post(server.url + "/v1/explain", json=body, timeout=60)
    else:
        r = httpx.post(server.url + "/v1/explain", content=body, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert (error["code"], error["param"], error["type"]) == (code, param, "invalid_request_error") and error["message"]


def test_int4_server_explains_where_its_layout_unpacks(setup):
    """int4 on a CPU with AVX512 keeps torch's tiles64 layout, which unpacks for the backward: the
    server explains as explain() does on the same int4 model. With torch's kernels for a CPU with
    neither AVX512 nor AVX2 (ATEN_CPU_CAPABILITY=default) int4 packs otherwise: a 400 that says why."""
    if quant._cpu_tile() != 64:
        pytest.skip("this CPU's int4 kernel does not read tiles64")
    tiny, _, images, _ = setup
    answers = []
    for env in ({}, cpu_without_avx512("default")):
        proc = ServerProcess(tiny.release, tiny.base, "--quantize", "int4", "--batch-size", "1", env=env)
        try:
            answers.append(httpx.post(proc.url + "/v1/explain", json=explain_body(images[0], None, FINDINGS), timeout=60))
        finally:
            assert proc.stop() == 0
    assert answers[0].status_code == 200, answers[0].text
    model, tokenizer = load_llavarad(str(tiny.release), str(tiny.base), torch.bfloat16, torch.device("cpu"), None, quantize="int4")
    expected = explain(model, tokenizer, load_image(str(images[0])), None, FINDINGS)
    for got, want in zip(answers[0].json()["sentences"], expected.sentences, strict=True):
        assert got["text"] == want.text and got["logprob"] == pytest.approx(want.logprob, abs=1e-3)
        np.testing.assert_array_equal(png_pixels(got["overlay"]), png_pixels(want.overlay))
    assert answers[1].status_code == 400
    error = answers[1].json()["error"]
    assert error["code"] == "explain_unavailable" and "neither AVX512 nor AVX2" in error["message"] and "gradients" in error["message"]
