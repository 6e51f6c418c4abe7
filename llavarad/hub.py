"""Downloads from the Hugging Face hub: the one place that uses huggingface_hub (the `hub` extra).

Files land in huggingface_hub's own cache (~/.cache/huggingface/hub, or $HF_HOME), so a second run
downloads nothing. Callers say what to do without huggingface_hub: they know which files they need.
"""

import sys
from pathlib import Path

from llavarad.errors import first_line


def hub_download(repo: str, filename: str | None = None, revision: str | None = None) -> Path:
    """One file of a hub repo, or the whole repo (a folder) when filename is None, at `revision`
    (default: main). Raises ImportError without huggingface_hub, and ConnectionError with a one-line
    reason, in whole sentences, when the download fails (no network, no such repo or file, a gated
    repo); `download_command` says how to get it elsewhere."""
    import huggingface_hub  # looked up at call time, so that tests can replace its functions

    what = f"{repo}/{filename}" if filename else repo
    print(f"{what}: downloading from the Hugging Face hub (kept in its cache)", file=sys.stderr)
    try:
        if filename is None:
            return Path(huggingface_hub.snapshot_download(repo, revision=revision))
        return Path(huggingface_hub.hf_hub_download(repo_id=repo, filename=filename, revision=revision))
    except Exception as e:  # many types (HTTP, offline, repo not found): one line, not a traceback
        raise ConnectionError(first_line(e)) from None


def download_command(repo: str, filename: str | None = None, revision: str | None = None) -> str:
    """The command that downloads what hub_download would, into a folder DIR of the user's choosing."""
    return " ".join(["hf download", repo, *([filename] if filename else []), *(["--revision", revision] if revision else []),
                     "--local-dir DIR"])


def hub_installed() -> bool:
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        return False
    return True


def file_url(repo: str, filename: str, revision: str | None = None) -> str:
    """Where a browser, curl or wget gets the same file without huggingface_hub."""
    return f"https://huggingface.co/{repo}/resolve/{revision or 'main'}/{filename}"
