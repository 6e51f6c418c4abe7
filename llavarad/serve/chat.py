"""An OpenAI chat-completions body -> a validated ChatRequest, or an APIError saying what is wrong.

Honoured: model, messages (one user message: one image_url part with a base64 data: URL, at most one
text part, the reason for exam), max_tokens / max_completion_tokens, temperature, top_p, seed,
stream, stream_options.include_usage, n (1 only). Other fields are ignored, as OpenAI-compatible
servers do. Nothing here opens a path or a URL: only data: URLs are accepted.
"""

import base64
import binascii
import math
from dataclasses import dataclass

from llavarad.errors import lone_surrogate
from llavarad.serve.api_error import APIError


@dataclass(frozen=True)
class Limits:
    served_name: str
    max_new_tokens: int  # the server's cap on max_tokens (also the default)
    max_image_bytes: int  # decoded image bytes


@dataclass(frozen=True)
class ChatRequest:
    model: str  # the served name, which the answer repeats
    image: bytes  # PNG, JPEG or DICOM bytes, not yet decoded
    reason: str | None  # None: the no-reason prompt
    max_tokens: int
    temperature: float  # 0: greedy
    top_p: float
    seed: int | None
    stream: bool
    include_usage: bool


def _invalid(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, code, param)


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _invalid(f"{name} must be a number", name, "invalid_type")
    if not math.isfinite(value):  # NaN passes every comparison below
        raise _invalid(f"{name} must be a finite number, got {value}", name)
    if value < low or value > high or (low_open and value == low):
        bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise _invalid(f"{name} must be in {bounds}, got {value}", name)
    return float(value)


def _integer(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _invalid(f"{name} must be an integer", name, "invalid_type")
    return value


def _max_tokens(body: dict, cap: int) -> int:
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    value = body.get(name)
    if value is None:
        return cap
    value = _integer(value, name)
    if value < 1:
        raise _invalid(f"{name} must be at least 1, got {value}", name)
    if value > cap:  # refused, not clamped: a silently shorter report would read as a complete one
        raise _invalid(f"{name} is {value}, over this server's limit of {cap} (serve.py --max-new-tokens)", name)
    return value


def check_text(value: str, field: str, param: str) -> None:
    """A lone surrogate (JSON's "\\ud800" escape), which no tokenizer takes, is refused, as infer.py refuses it."""
    if (i := lone_surrogate(value)) is not None:
        raise _invalid(f"{field} holds a lone surrogate (\\u{ord(value[i]):04x}), not text", param)


def decode_data_url(url: object, max_bytes: int) -> bytes:
    """'data:<media type>;base64,<data>' -> the bytes; any other URL is refused without being opened."""
    if not isinstance(url, str):
        raise _invalid("image_url.url must be a string", "image_url", "invalid_type")
    if not url.startswith("data:"):
        scheme = repr(url.split(":", 1)[0][:20]) if ":" in url else "no scheme"
        raise _invalid(f"image_url must be a base64 data: URL (got {scheme}); this server never fetches a URL or opens a path", "image_url")
    header, sep, data = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise _invalid("image_url must be a base64 data: URL (data:image/png;base64,...)", "image_url")
    if len(data) // 4 * 3 > max_bytes + 2:  # before decoding: base64 is 4 characters per 3 bytes
        raise APIError(413, f"image is over the limit of {max_bytes} bytes", "image_too_large", "image_url")
    try:
        image = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise _invalid("image_url data is not valid base64", "image_url") from None
    if len(image) > max_bytes:
        raise APIError(413, f"image is {len(image)} bytes, over the limit of {max_bytes} bytes", "image_too_large", "image_url")
    if not image:
        raise _invalid("image_url data is empty", "image_url")
    return image


def _content(messages: object) -> tuple[object, str | None]:
    """The one user message's image URL and text (None when there is no text part)."""
    if not isinstance(messages, list) or len(messages) != 1 or not isinstance(messages[0], dict):
        raise _invalid("messages must hold exactly one message (multi-turn chat is not supported)", "messages")
    message = messages[0]
    if message.get("role") != "user":
        raise _invalid("the message's role must be 'user'", "messages")
    parts = message.get("content")
    if not isinstance(parts, list) or not all(isinstance(p, dict) for p in parts):
        raise _invalid("the message's content must be a list of parts holding one image_url part", "messages")
    images = [p for p in parts if p.get("type") == "image_url"]
    texts = [p for p in parts if p.get("type") == "text"]
    if len(images) + len(texts) != len(parts):
        raise _invalid("content parts must have type 'image_url' or 'text'", "messages")
    if len(images) != 1:
        raise _invalid(f"the message must hold exactly one image_url part, got {len(images)}", "messages")
    if len(texts) > 1:
        raise _invalid(f"the message may hold at most one text part (the reason for exam), got {len(texts)}", "messages")
    image_url = images[0].get("image_url")
    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    text = texts[0].get("text") if texts else None
    if text is not None and not isinstance(text, str):
        raise _invalid("a text part's text must be a string", "messages", "invalid_type")
    if text is not None:
        check_text(text, f"messages[0].content[{parts.index(texts[0])}].text", "messages")
    return url, text


def parse_chat(body: object, limits: Limits) -> ChatRequest:
    if not isinstance(body, dict):
        raise _invalid("the request body must be a JSON object", None, "invalid_json")
    model = body.get("model")
    if model is None:
        raise _invalid("model is required", "model", "missing_required_parameter")
    if model != limits.served_name:
        raise APIError(404, f"model {str(model)[:100]!r} does not exist; this server serves {limits.served_name!r}", "model_not_found", "model")
    if body.get("n") not in (None, 1):
        raise _invalid("n must be 1", "n")
    url, text = _content(body.get("messages"))
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise _invalid("stream must be a boolean", "stream", "invalid_type")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise _invalid("stream_options must be an object", "stream_options", "invalid_type")
    seed = body.get("seed")
    if seed is not None:
        seed = _integer(seed, "seed")
        if not -(2**63) <= seed < 2**63:
            raise _invalid("seed must fit in 64 bits", "seed")
    return ChatRequest(
        model=model,
        image=decode_data_url(url, limits.max_image_bytes),
        reason=text if text and text.strip() else None,
        max_tokens=_max_tokens(body, limits.max_new_tokens),
        temperature=_number(body, "temperature", 0.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        seed=seed,
        stream=stream,
        include_usage=bool(options.get("include_usage")),
    )
