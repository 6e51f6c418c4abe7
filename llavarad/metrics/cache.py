"""A JSON cache of per-text results (labels), kept apart for each set of model weights.

References repeat across evaluation runs, so rescoring a new prediction file should only label the
new texts. Entries are filed under a fingerprint of the weight files: other weights never read
stale labels, and one cache file can serve several checkpoints.
"""

import hashlib
import json
import os


def file_fingerprint(*paths: str) -> str:
    """sha256 over the contents of the files (e.g. the checkpoint and its vocab); a folder (an
    unpacked model archive) stands for all the files under it, in sorted path order."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            files += sorted(os.path.join(root, name) for root, _, names in os.walk(path) for name in names)
        else:
            files.append(path)
    h = hashlib.sha256()
    for path in files:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()[:16]


def load_cache(path: str | None, fingerprint: str) -> dict:
    """The entries stored for `fingerprint` ({} when there is no cache yet)."""
    if path is None or not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: cache file is not valid JSON ({e}); delete it to rebuild") from None
    return data.get(fingerprint, {})


def save_cache(path: str | None, fingerprint: str, entries: dict) -> None:
    """Store `entries` for `fingerprint`, keeping other fingerprints; written atomically."""
    if path is None:
        return
    data = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    data[fingerprint] = entries
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False)
    os.replace(tmp, path)
