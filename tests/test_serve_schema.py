"""The chat-completions schema (llavarad/serve/chat.py) at each limit: the bound is accepted and a step
past it is refused with a 4xx naming the field; NaN, Infinity and -Infinity (which Python's JSON parser
accepts) are refused for every numeric field; a text with a lone surrogate is refused with a 400 naming
the field, in chat and in /v1/explain. No server: the parser alone."""

import base64
import json

import pytest

from llavarad.serve.api_error import APIError
from llavarad.serve.chat import Limits, parse_chat
from llavarad.serve.explanation import parse_explain

CAP, MAX_IMAGE = 256, 1000
LIMITS = Limits("llava-rad", CAP, MAX_IMAGE)


def body(image: bytes = b"\x89PNG", texts: tuple[str, ...] = ("Cough.",), images: int = 1, messages: int = 1, **fields) -> dict:
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    content = [{"type": "image_url", "image_url": {"url": url}} for _ in range(images)]
    content += [{"type": "text", "text": t} for t in texts]
    return {"model": "llava-rad", "messages": [{"role": "user", "content": content}] * messages, **fields}


def refused(b: dict, status: int = 400) -> APIError:
    with pytest.raises(APIError) as e:
        parse_chat(b, LIMITS)
    assert e.value.status == status, e.value
    return e.value


# (field, the bound, a step past it): the bound is accepted, the step refused with param == field
BOUNDS = [
    ("temperature", 0, -0.0001), ("temperature", 2, 2.0001),
    ("top_p", 1, 1.0001), ("top_p", 1e-9, 0),
    ("max_tokens", 1, 0), ("max_tokens", CAP, CAP + 1),
    ("max_completion_tokens", 1, 0), ("max_completion_tokens", CAP, CAP + 1),
    ("seed", -(2**63), -(2**63) - 1), ("seed", 2**63 - 1, 2**63),
    ("n", 1, 2),
]


@pytest.mark.parametrize("field,bound,past", BOUNDS)
def test_each_limit_at_the_bound_and_past_it(field, bound, past):
    chat = parse_chat(body(**{field: bound}), LIMITS)
    if field != "n":
        assert getattr(chat, field.replace("max_completion_tokens", "max_tokens")) == bound
    assert refused(body(**{field: past})).param == field


@pytest.mark.parametrize("field", ["temperature", "top_p", "max_tokens", "max_completion_tokens", "seed", "n"])
@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_nan_and_infinity_are_refused_for_every_numeric_field(field, literal):
    wire = json.dumps(body()).replace('"model"', f'"{field}": {literal}, "model"', 1)
    error = refused(json.loads(wire))  # what the server's json.loads gives it
    assert error.param == field and error.code in ("invalid_value", "invalid_type")


def test_image_size_at_the_limit_and_past_it():
    assert parse_chat(body(b"\x89" * MAX_IMAGE), LIMITS).image == b"\x89" * MAX_IMAGE
    assert refused(body(b"\x89" * (MAX_IMAGE + 1)), 413).param == "image_url"
    assert refused(body(b"")).param == "image_url"


def test_parts_and_messages_at_their_counts():
    assert parse_chat(body(texts=()), LIMITS).reason is None
    assert parse_chat(body(texts=("a",)), LIMITS).reason == "a"
    for bad in (body(texts=("a", "b")), body(images=0), body(images=2), body(messages=2)):
        assert refused(bad).param == "messages"


@pytest.mark.parametrize("text", ["\ud800", "Cough \udcff.", "x\udfff"])
def test_a_lone_surrogate_is_refused_naming_the_field(text):
    error = refused(body(texts=(text,)))
    assert error.param == "messages" and "messages[0].content[1].text" in error.message and "lone surrogate" in error.message
    assert "\\u" in error.message and text not in error.message  # the message itself is valid UTF-8
    json.dumps(error.body(), ensure_ascii=False).encode("utf-8")
    for field in ("reason", "findings"):
        explain = {"image_url": body()["messages"][0]["content"][0]["image_url"], "reason": "Cough.", "findings": "Normal.", field: text}
        with pytest.raises(APIError) as e:
            parse_explain(explain, MAX_IMAGE)
        assert (e.value.status, e.value.param) == (400, field) and "lone surrogate" in e.value.message


def test_a_url_scheme_with_a_lone_surrogate_gives_an_encodable_message():
    b = body()
    b["messages"][0]["content"][0]["image_url"]["url"] = "\ud800x:y"
    json.dumps(refused(b).body(), ensure_ascii=False).encode("utf-8")
