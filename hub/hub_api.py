"""Calls to the Hugging Face Hub client, with its failures turned into one RemoteError line each."""
from __future__ import annotations

import contextlib
import importlib

from huggingface_hub.errors import (
    EntryNotFoundError,
    HFValidationError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from .errors import RemoteError
from .manifest import MANIFEST


def _client_errors() -> tuple[type[BaseException], ...]:
    """What the Hub client raises for HTTP and transport failures (httpx or its fork, by version)."""
    errors: list[type[BaseException]] = [OSError, EntryNotFoundError, HFValidationError]
    for module in ("httpx2", "httpx"):
        with contextlib.suppress(ImportError):
            errors.append(importlib.import_module(module).HTTPError)
    return tuple(errors)


@contextlib.contextmanager
def hub_call(what: str, repo_id: str, revision: str | None):
    """Turn a Hub client failure into one RemoteError line."""
    try:
        yield
    except RepositoryNotFoundError:
        raise RemoteError(f"{what}: repository {repo_id!r} not found (or no access with this token)") from None
    except RevisionNotFoundError:
        raise RemoteError(f"{what}: revision {revision!r} not found in {repo_id}") from None
    except EntryNotFoundError:
        raise RemoteError(f"{what}: {repo_id}@{revision or 'main'} has no {MANIFEST}: not a BoRA Hub repo") from None
    except _client_errors() as e:
        raise RemoteError(f"{what}: {' '.join(str(e).split())[:300] or type(e).__name__}") from None


def subset(requested: list[str] | None, available: list[str], where: str) -> list[str]:
    """The requested tasks in ``available`` order (all when none requested); unknown ones are an error."""
    if not requested:
        return list(available)
    unknown = [n for n in requested if n not in available]
    if unknown:
        raise RemoteError(f"--tasks: unknown task(s) {', '.join(unknown)} ({where}: {', '.join(available)})")
    return [n for n in available if n in requested]
