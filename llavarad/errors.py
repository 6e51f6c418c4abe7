"""One-line error messages from library exceptions, for the `<file>: <problem> (<first line>)` errors."""


def first_line(error: BaseException) -> str:
    """'TypeName: first line of the message' (cut to 200 characters), or just the type name when
    the message is empty (as an empty file's EOFError is)."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:200]}" if text else type(error).__name__
