"""serve.py's API against infer.py: for RGB, grayscale, 16-bit PNG, JPEG and DICOM images and reasons
(none, empty, multi-line, unicode) the content, plain and streamed, equals what `infer.py IMAGE --reason
TEXT` prints; usage counts the prompt's tokens (counted here with sentencepiece) and the image slots;
the official openai client gets the same text; sampling: temperature 0 and a tiny top_p are greedy, a
seed gives the same text alone and batched. A real server process on 127.0.0.1."""

import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import sentencepiece as spm
from _infer_fixtures import shared_tiny_release
from _serve_fixtures import NEW, ServerProcess, chat_body, infer_stdout, shared_server, sse_text
from PIL import Image

from llavarad.model.prompt import SYSTEM, build_question

N_PATCHES = 4  # the tiny tower: 28 px images, 14 px patches

CASES = [
    ("rgb.png", None),
    ("gray.png", ""),  # an empty text part gives the no-reason prompt (infer.py without --reason)
    ("deep16.png", "Shortness of breath.\nEvaluate for pneumonia."),
    ("photo.jpg", "Cough."),
    ("mr.dcm", "Douleur thoracique — évaluer 肺炎 ✓"),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return shared_tiny_release(tmp_path_factory)


@pytest.fixture(scope="module")
def server(tiny):
    return shared_server(tiny)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    pydicom = pytest.importorskip("pydicom")
    folder = tmp_path_factory.mktemp("serve_images")
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)).save(folder / "rgb.png")
    Image.fromarray(rng.integers(0, 256, (45, 33), dtype=np.uint8)).save(folder / "gray.png")
    Image.fromarray(rng.integers(0, 4096, (36, 30), dtype=np.uint16)).save(folder / "deep16.png")  # mode I;16
    Image.fromarray(rng.integers(0, 256, (50, 44, 3), dtype=np.uint8)).save(folder / "photo.jpg", quality=90)
    shutil.copy(pydicom.data.get_testdata_file("MR_small.dcm"), folder / "mr.dcm")
    assert Image.open(folder / "deep16.png").mode == "I;16"
    return folder


def expected_prompt_tokens(tiny, reason: str | None) -> int:
    """BOS + the text before the image + the image slots + the text after it, counted with sentencepiece."""
    sp = spm.SentencePieceProcessor(model_file=str(tiny.base / "tokenizer.model"))
    question = build_question(reason)
    return 1 + len(sp.encode(SYSTEM + " USER: ")) + N_PATCHES + len(sp.encode("\n" + question + " ASSISTANT:"))


@pytest.mark.parametrize("name,reason", CASES)
def test_content_and_stream_equal_infer(server, tiny, images, name, reason):
    expected = infer_stdout(tiny.release, tiny.base, images / name, reason or None)
    body = chat_body(images / name, reason)
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    answer = r.json()
    choice = answer["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": expected}
    assert answer["object"] == "chat.completion" and answer["model"] == "llava-rad"
    usage = answer["usage"]
    assert usage["prompt_tokens"] == expected_prompt_tokens(tiny, reason or None)
    if choice["finish_reason"] == "length":
        assert usage["completion_tokens"] == NEW
    else:
        assert choice["finish_reason"] == "stop" and usage["completion_tokens"] <= NEW
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

    with httpx.stream("POST", server.url + "/v1/chat/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}}, timeout=60) as s:
        assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
        text, chunks, lines = sse_text(s)
    assert text == expected
    assert lines[-1] == "[DONE]"
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == choice["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == usage
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)


def test_cases_give_different_texts(server, tiny, images):
    """The equality above would not notice a server that ignores its input."""
    texts = {infer_stdout(tiny.release, tiny.base, images / n, r or None) for n, r in CASES[:3]}
    assert len(texts) == 3


def test_openai_client(server, tiny, images):
    from openai import OpenAI

    expected = infer_stdout(tiny.release, tiny.base, images / "rgb.png", "Cough.")
    client = OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
    messages = chat_body(images / "rgb.png", "Cough.")["messages"]
    answer = client.chat.completions.create(model="llava-rad", messages=messages, max_tokens=NEW)
    assert answer.choices[0].message.content == expected
    chunks = list(client.chat.completions.create(model="llava-rad", messages=messages, max_tokens=NEW, stream=True,
                                                 stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == answer.usage.completion_tokens
    assert [m.id for m in client.models.list().data] == ["llava-rad"]


def post(server, body) -> dict:
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_greedy_settings(server, tiny, images):
    greedy = infer_stdout(tiny.release, tiny.base, images / "gray.png", "Fever.")
    assert post(server, chat_body(images / "gray.png", "Fever.", temperature=0)) == greedy
    assert post(server, chat_body(images / "gray.png", "Fever.", temperature=1.5, top_p=1e-6, seed=1)) == greedy
    assert post(server, chat_body(images / "gray.png", "Fever.", temperature=1.5, seed=1)) != greedy  # it does sample


def test_seed_gives_the_same_text_alone_and_batched(server, images):
    sampled = chat_body(images / "rgb.png", "Cough.", temperature=1.0, top_p=0.95, seed=1234, max_tokens=16)
    alone = [post(server, sampled), post(server, sampled)]
    assert alone[0] == alone[1]
    others = [chat_body(images / n, r, temperature=t, seed=s, max_tokens=24) for (n, r), t, s in zip(CASES, [0, 0.7, 1.3, 0, 1.0], [1, 2, 3, 4, 5])]
    with ThreadPoolExecutor(6) as pool:
        batched = list(pool.map(lambda b: post(server, b), [others[0], others[1], sampled, others[2], others[3], sampled]))
    assert batched[2] == batched[5] == alone[0]
    assert post(server, {**sampled, "seed": 4321}) != alone[0]


def test_models_health_metrics(server):
    assert httpx.get(server.url + "/v1/models").json()["data"][0]["id"] == "llava-rad"
    assert httpx.get(server.url + "/health").status_code == 200
    metrics = httpx.get(server.url + "/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    for name in ['llavarad_requests_total{outcome="ok"}', "llavarad_queue_length 0.0", "llavarad_active_rows 0.0",
                 "llavarad_generated_tokens_total", "llavarad_time_to_first_token_seconds_bucket", "llavarad_request_latency_seconds_count"]:
        assert name in text, name
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "research use only" in page.text.lower()
    for asset in ("/static/app.js", "/static/style.css"):
        assert httpx.get(server.url + asset).status_code == 200
    assert "http" not in page.text.replace(server.url, "").split("<body>")[0].lower()  # no external stylesheet or font


def test_preview_renders_dicom_as_png(server, images):
    from io import BytesIO

    from llavarad.infer.images import load_image

    r = httpx.post(server.url + "/v1/preview", content=(images / "mr.dcm").read_bytes(), timeout=60)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    got = np.asarray(Image.open(BytesIO(r.content)).convert("RGB"))
    assert np.array_equal(got, np.asarray(load_image(str(images / "mr.dcm"))))  # 64x64: not resized
    bad = httpx.post(server.url + "/v1/preview", content=b"not an image", timeout=60)
    assert bad.status_code == 400 and "cannot read image" in json.loads(bad.text)["error"]["message"]


def test_logs_hold_no_image_or_reason(server, images):
    """Run after the requests above: the server's log has their ids and sizes, never their content."""
    post(server, chat_body(images / "rgb.png", "Confidential indication 4711."))
    log = server.stderr()
    assert "request " in log and " B, prompt " in log
    for secret in ["Confidential indication", "Douleur thoracique", "Shortness of breath", "Cough."]:
        assert secret not in log
    payload = chat_body(images / "rgb.png")["messages"][0]["content"][0]["image_url"]["url"]
    assert payload[22:80] not in log  # no piece of the base64 image


def test_quantized_server_equals_quantized_infer(tiny, images):
    """serve.py --quantize int8 answers what infer.py --quantize int8 prints: one loader for both."""
    proc = ServerProcess(tiny.release, tiny.base, "--quantize", "int8", "--batch-size", "2")
    try:
        r = httpx.post(proc.url + "/v1/chat/completions", json=chat_body(images / "rgb.png", "Cough."), timeout=60)
        assert r.status_code == 200, r.text
        expected = infer_stdout(tiny.release, tiny.base, images / "rgb.png", "Cough.", NEW, "--quantize", "int8")
        assert r.json()["choices"][0]["message"]["content"] == expected
    finally:
        assert proc.stop() == 0
