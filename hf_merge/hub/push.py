"""Publish a local folder to the Hugging Face Hub in exactly one commit, retrying only what is safe to retry.

A Hub commit is atomic: the revision moves from its old state to the new one in one step or not at all. So
:func:`push_folder` builds the whole commit (every file of the folder) and, on a transient failure (HTTP 5xx, 408,
429, a dropped or timed-out connection), sends the *whole* commit again after a backoff — a revision is never left
half-updated. Client errors (401 unauthenticated, 403 no write access, 404 unknown repo or revision, ...) are not
retried: they raise :class:`HubPushError` saying what to fix.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

TRANSIENT_STATUS_CODES = frozenset({408, 429, 500, 502, 503, 504})
_CLIENT_ERROR_HINTS = {
    401: "the Hub did not accept the credentials: pass token=... or log in with `hf auth login`.",
    402: "the Hub requires a paid plan for this operation.",
    403: "the token has no write access to this repo or namespace: use a token with the 'write' role that "
    "belongs to (or is a member of) the repo's owner.",
    404: "the repo or revision does not exist, or the token cannot see it (private repo of another owner).",
    409: "the request conflicts with the repo's current state (e.g. a concurrent commit): push again.",
    412: "the revision moved while the commit was prepared: push again.",
    413: "the commit payload is too large for a single regular commit.",
}


class HubPushError(RuntimeError):
    """A push that did not commit anything: the message says why and what to do. ``status_code`` is the HTTP
    status of the failing request (``None`` for a connection failure)."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """Bounded exponential backoff: ``max_attempts`` tries in all, waiting ``initial_delay * multiplier**k``
    seconds (capped at ``max_delay``) before retry ``k + 1``. Each request is abandoned after ``timeout`` seconds
    without progress (connecting, or waiting for the answer), which counts as a transient failure: a push to an
    endpoint that never answers fails after at most ``max_attempts × (timeout + max_delay)`` seconds per request,
    with nothing committed. ``sleep`` is injectable for tests."""

    max_attempts: int = 5
    initial_delay: float = 1.0
    multiplier: float = 2.0
    max_delay: float = 30.0
    timeout: float = 60.0
    sleep: Callable[[float], None] = time.sleep

    def __post_init__(self) -> None:
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise ValueError(f"max_attempts must be an int >= 1, got {self.max_attempts!r}.")
        if not isinstance(self.timeout, (int, float)) or not 0 < self.timeout < float("inf"):
            raise ValueError(f"timeout must be a finite number of seconds > 0, got {self.timeout!r}.")
        for name in ("initial_delay", "max_delay"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}.")
        if not isinstance(self.multiplier, (int, float)) or self.multiplier < 1:
            raise ValueError(f"multiplier must be a number >= 1, got {self.multiplier!r}.")

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (1-based)."""
        return min(self.max_delay, self.initial_delay * self.multiplier ** (retry - 1))


def status_code_of(error: BaseException) -> int | None:
    """The HTTP status behind a ``huggingface_hub`` error, or ``None`` when there was no response."""
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None)


def is_transient(error: BaseException) -> bool:
    """True for failures worth retrying unchanged: 5xx/408/429 answers, dropped, refused or timed-out connections."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(error, OfflineModeIsEnabled):
        return False
    if isinstance(error, HfHubHTTPError):
        status = status_code_of(error)
        return status is not None and (status in TRANSIENT_STATUS_CODES or status >= 500)
    return isinstance(error, (httpx2.TransportError, ConnectionError, TimeoutError))


def with_retries(action: Callable[[], T], *, what: str, retry: RetryPolicy) -> T:
    """Run ``action``; retry transient failures per ``retry``; turn every other Hub failure into HubPushError."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    attempt = 0
    while True:
        attempt += 1
        try:
            return action()
        except Exception as error:
            status = status_code_of(error)
            if is_transient(error):
                if attempt == retry.max_attempts:
                    raise HubPushError(
                        f"{what} failed {attempt} time(s) with transient errors; nothing was committed. "
                        f"Last error: {_first_line(error)}",
                        status,
                    ) from error
                retry.sleep(retry.delay(attempt))
                continue
            if isinstance(error, OfflineModeIsEnabled):
                raise HubPushError(
                    f"{what} is impossible: Hugging Face offline mode is on (HF_HUB_OFFLINE=1). Unset it to push."
                ) from error
            if isinstance(error, HfHubHTTPError):
                hint = _CLIENT_ERROR_HINTS.get(status or 0, "the Hub rejected the request.")
                raise HubPushError(
                    f"{what} failed with HTTP {status}: {hint} Nothing was committed. Hub said: {_first_line(error)}",
                    status,
                ) from error
            raise


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def folder_files(folder: str | os.PathLike) -> dict[str, Path]:
    """``{path_in_repo: local_path}`` for every file under ``folder``, skipping hidden files and folders."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"Cannot push {root}: it is not a folder.")
    files = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts):
            files[relative.as_posix()] = path
    if not files:
        raise ValueError(f"Cannot push {root}: it contains no files.")
    return files


@contextlib.contextmanager
def bounded_requests(timeout: float) -> Iterator[None]:
    """Every request ``huggingface_hub`` makes inside gives up after ``timeout`` seconds without progress (its own
    client has no timeout at all); the client in use before is restored afterwards."""
    from huggingface_hub import close_session, set_client_factory
    from huggingface_hub.utils import _http

    previous = _http._GLOBAL_CLIENT_FACTORY

    def bounded_client() -> Any:
        client = previous()
        client.timeout = timeout
        return client

    set_client_factory(bounded_client)
    close_session()  # the next request builds a client from the bounded factory
    try:
        yield
    finally:
        set_client_factory(previous)
        close_session()


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    create_pr: bool = False,
    endpoint: str | None = None,
    extra_files: Mapping[str, bytes] | None = None,
    retry: RetryPolicy | None = None,
) -> Any:
    """Upload every file of ``folder`` (plus ``extra_files``) to ``repo_id`` in one commit; return its CommitInfo.

    The repo is created if needed (``private`` applies only then). A ``revision`` other than ``main`` is created
    as a branch from ``main`` if it does not exist. Hidden files (``.git``, ``.cache``, ...) are skipped.

    Example:
        >>> push_folder("out/merged", "me/bert-ties-merge", private=True)
    """
    from huggingface_hub import HfApi
    from huggingface_hub.utils import validate_repo_id

    validate_repo_id(repo_id)
    files = folder_files(folder)
    extras = dict(extra_files or {})
    retry = retry if retry is not None else RetryPolicy()
    api = HfApi(endpoint=endpoint, token=token)
    with bounded_requests(retry.timeout):
        return _push(api, folder, repo_id, files, extras, private, revision, commit_message, commit_description,
                     create_pr, retry)


def _push(api: Any, folder: str | os.PathLike, repo_id: str, files: Mapping[str, Path], extras: Mapping[str, bytes],
          private: bool | None, revision: str | None, commit_message: str | None, commit_description: str | None,
          create_pr: bool, retry: RetryPolicy) -> Any:
    from huggingface_hub import CommitOperationAdd

    with_retries(
        lambda: api.create_repo(repo_id, private=private, exist_ok=True), what=f"Creating repo {repo_id}", retry=retry
    )
    if revision not in (None, "main") and not create_pr:
        with_retries(
            lambda: api.create_branch(repo_id, branch=revision, exist_ok=True),
            what=f"Creating branch {revision!r} of {repo_id}",
            retry=retry,
        )

    def commit() -> Any:
        # Fresh operations each attempt: create_commit mutates them (upload modes, shas).
        operations = [
            CommitOperationAdd(path_in_repo=path, path_or_fileobj=str(local))
            for path, local in files.items()
            if path not in extras
        ]
        operations += [CommitOperationAdd(path_in_repo=path, path_or_fileobj=data) for path, data in extras.items()]
        return api.create_commit(
            repo_id,
            operations,
            commit_message=commit_message or f"Upload {Path(folder).name} with hf-merge",
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
        )

    count = len(set(files) | set(extras))
    return with_retries(commit, what=f"Committing {count} file(s) to {repo_id}", retry=retry)
