"""One-line error messages from library exceptions, for the `<file>: <problem> (<first line>)` errors."""

import re

LIMIT = 200  # characters of a library's message kept in ours


def lone_surrogate(text: str) -> int | None:
    """Where `text` holds its first lone surrogate (U+D800-U+DFFF alone), or None. JSON's "\\ud800"
    escape gives one, and so do command-line bytes that are not UTF-8 (U+DC80-U+DCFF); no tokenizer,
    file system or UTF-8 writer takes them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


def first_line(error: BaseException) -> str:
    """'TypeName: first line of the message', or just the type name when the message is empty (as an
    empty file's EOFError is). A first line over LIMIT characters keeps its whole sentences that fit,
    never a sentence cut short; a first sentence over LIMIT alone is cut at a word and ends in '...'."""
    text = str(error).strip()
    if not text:
        return type(error).__name__
    line = text.splitlines()[0]
    if len(line) > LIMIT:
        ends = [m.end() for m in re.finditer(r"[.!?](?=\s)", line) if m.end() <= LIMIT]
        line = line[: ends[-1]] if ends else line[: LIMIT].rsplit(" ", 1)[0] + " ..."
    return f"{type(error).__name__}: {line}"
