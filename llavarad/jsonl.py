"""The one JSON-lines reader (query files, predictions files and our own resumable output), and
`read_text`, the reader of every other text file a user gives us (annotation JSON, configs).

Rules, the same for every file:
  - the file is UTF-8; a line that is not is an error naming the line; a leading byte-order mark
    (Windows editors and Excel write one) is not part of the text;
  - blank lines are skipped;
  - every other line is one JSON object, or the file is refused at that line;
  - a complete last line counts whether or not it ends with a newline;
  - only in a file that we append to ourselves (`resumable=True`) may the last line be torn: a
    line without its newline that begins a JSON object ("{") but does not parse is what a kill
    mid-write leaves, and is dropped. Anything else there (a `notes.txt`) is refused like any
    file that is not JSON lines, so an output path that names someone's file is never overwritten.
Lines are split at b"\\n" only: JSON escapes every newline inside a string, while str.splitlines
would also split at U+2028 and friends, which a writer may leave raw inside a string.
"""

import codecs
import json
from pathlib import Path


def _decode(data: bytes, path: Path, first_line: int = 1) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + data.count(b"\n", 0, e.start)
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte {data[e.start]:#04x})") from None


def _read_bytes(path: Path) -> bytes:
    """The file's bytes without a leading UTF-8 byte-order mark."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: is a folder, not a file" if path.is_dir() else f"{path}: file not found")
    return path.read_bytes().removeprefix(codecs.BOM_UTF8)


def read_text(path: str | Path) -> str:
    """A whole UTF-8 file (JSON, TOML), without a leading byte-order mark; a byte that is not UTF-8
    is an error naming its line."""
    return _decode(_read_bytes(Path(path)), Path(path))


def read_jsonl(path: str | Path, resumable: bool = False) -> list[tuple[int, dict]]:
    """(line number, object) for every record of a JSON-lines file, by the rules above."""
    path = Path(path)
    lines = _read_bytes(path).split(b"\n")  # the last item is b"" when the file ends with a newline
    out = []
    for n, raw in enumerate(lines, start=1):
        line = _decode(raw, path, n)
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            if resumable and n == len(lines) and line.lstrip().startswith("{"):
                continue  # torn by a kill mid-write; the writer cuts it (end_at_line) before appending
            raise ValueError(f"{path}:{n}: not valid JSON (line {n} is not valid JSON: {e.msg})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
        out.append((n, obj))
    return out


def end_at_line(path: Path) -> None:
    """Before appending to a file read with `resumable=True`: a complete last line gets its newline,
    a torn one is cut, so the next record starts on a line of its own and nothing complete is lost."""
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return
    start = data.rfind(b"\n") + 1
    try:
        json.loads(data[start:])
    except ValueError:  # torn (read_jsonl has refused every other kind of bad last line)
        with open(path, "r+b") as f:
            f.truncate(start)
        return
    with open(path, "ab") as f:
        f.write(b"\n")


class Appender:
    """Appends one JSON line per record and flushes it, after ending the file at a line boundary
    (end_at_line), so a kill loses nothing written. A missing folder is made. `ensure_ascii`: as
    json.dumps (False keeps reports' non-ASCII text readable)."""

    def __init__(self, path: Path, ensure_ascii: bool = True):
        if path.is_dir():
            raise ValueError(f"{path}: is a folder, expected a JSON-lines file")
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_file():
            end_at_line(path)
        self.file, self.ensure_ascii = open(path, "a", encoding="utf-8"), ensure_ascii

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record, ensure_ascii=self.ensure_ascii) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()
