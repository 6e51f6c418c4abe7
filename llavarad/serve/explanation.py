"""POST /v1/explain: a body {image_url, reason, findings} -> a validated ExplainRequest (or an APIError),
and an Explanation -> the response body, each sentence's overlay as a PNG data: URL.

    {"image_url": "data:image/png;base64,...", "reason": "Cough." or null, "findings": "..."}
    -> {"object": "explanation", "method": ..., "findings": ..., "sentences":
        [{"text", "start", "end", "logprob", "overlay": "data:image/png;base64,...", "map": "data:..."}, ...]}

start and end are character offsets into the response's "findings" (the text as the tokenizer
spells it back, which is what was explained). "overlay" is the X-ray with the map, a colour scale and
the sentence as caption (as infer.py --explain writes it); "map" is the map alone, a transparent PNG
of the image's shape, for drawing over the picture (the page does).
"""

import base64
import io
from dataclasses import dataclass

from PIL import Image

from llavarad.explain.overlay import layer
from llavarad.explain.relevance import METHOD, Explanation
from llavarad.serve.api_error import APIError
from llavarad.serve.chat import check_text, decode_data_url


@dataclass(frozen=True)
class ExplainRequest:
    image: bytes  # PNG, JPEG or DICOM bytes, not yet decoded
    reason: str | None  # None: the no-reason prompt
    findings: str


def parse_explain(body: object, max_image_bytes: int) -> ExplainRequest:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", "invalid_json")
    reason, findings = body.get("reason"), body.get("findings")
    if reason is not None and not isinstance(reason, str):
        raise APIError(400, "reason must be a string or null", "invalid_type", "reason")
    if not isinstance(findings, str) or not findings.strip():
        raise APIError(400, "findings must be a non-empty string: the report to explain", "invalid_value", "findings")
    for name, text in (("reason", reason or ""), ("findings", findings)):
        check_text(text, name, name)
    image_url = body.get("image_url")
    url = image_url.get("url") if isinstance(image_url, dict) else image_url  # as in chat: "..." or {"url": "..."}
    return ExplainRequest(decode_data_url(url, max_image_bytes), reason if reason and reason.strip() else None, findings)


def _png_url(image: Image.Image) -> str:
    png = io.BytesIO()
    image.save(png, "PNG")
    return "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()


def explanation_body(expl: Explanation, image_size: int) -> dict:
    """The response (`image_size`: the side of the tower's input); PNG encoding is slow enough to run off the event loop."""
    sentences = [{"text": s.text, "start": s.chars[0], "end": s.chars[1], "logprob": round(s.logprob, 4),
                  "overlay": _png_url(s.overlay), "map": _png_url(layer(s.relevance, *expl.image_size, image_size))}
                 for s in expl.sentences]
    return {"object": "explanation", "method": METHOD, "findings": expl.findings, "sentences": sentences}
