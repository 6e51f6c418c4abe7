"""One-line error messages from library exceptions, for the `<file>: <problem> (<reason>)` errors."""


def reason(error: BaseException) -> str:
    """The first line of an exception's message (cut to 200 characters), or its type name when it has none."""
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


def described(error: BaseException) -> str:
    """'TypeName: first line' (just the type name when the message is empty, as an empty file's EOFError is)."""
    text = str(error).strip()
    return f"{type(error).__name__}: {reason(error)}" if text else type(error).__name__
