"""One-line error messages from library exceptions, for the `<file>: <problem> (<reason>)` errors."""


def reason(error: BaseException) -> str:
    """The first line of an exception's message (cut to 200 characters), or its type name when it has none."""
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__
