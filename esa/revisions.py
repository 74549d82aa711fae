"""Hub revisions pinned to commits: a study's results name the exact weights and text they came from.

A hub model (``model.revision``) or dataset (``data.revision``) is named by a branch, a tag or a
commit; ``None`` is the hub's ``main``. When the workflow is planned, each is resolved to the
40-hex commit it names now (:func:`resolve_revision`), and that commit enters the model's and
the data's step specs, so their keys: after ``main`` moves on the hub, the next run plans new
model and data steps, and everything downstream of them, instead of reusing results computed on
the old weights. The model step loads that commit and records it in ``model.json``; every
later load of the model goes through that reference.

Resolution asks the hub. Where it cannot be reached (``HF_HUB_OFFLINE=1``, no network), the
hub cache answers: ``<cache>/<type>s--<org>--<name>/refs/<revision>`` holds the commit that
revision named when it was last downloaded. With neither, planning stops with one line naming
the repository and the revision: ESA does not guess which weights a result belongs to.
"""

from __future__ import annotations

import logging
import os
import re
from functools import cache
from pathlib import Path

from .errors import ESAError

log = logging.getLogger(__name__)

MAIN = "main"
_COMMIT = re.compile(r"[0-9a-f]{40}")
_TRUE = {"1", "on", "yes", "true"}


def hub_cache() -> Path:
    """The hub cache directory, read when called (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else
    ``~/.cache/huggingface/hub``): huggingface_hub's own constant is fixed when it is imported."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "huggingface"
    return Path(home).expanduser() / "hub"


def cached_commit(repo_id: str, revision: str, repo_type: str) -> str | None:
    """The commit ``revision`` named when ``repo_id`` was last downloaded into the hub cache."""
    ref = hub_cache() / f"{repo_type}s--{repo_id.replace('/', '--')}" / "refs" / revision
    if not ref.is_file():
        return None
    commit = ref.read_text().strip()
    return commit if _COMMIT.fullmatch(commit) else None


@cache
def resolve_revision(repo_id: str, revision: str | None, repo_type: str) -> str:
    """The 40-hex commit that ``revision`` (None: ``main``) of the hub repository ``repo_id``
    (``repo_type``: model or dataset) names: a commit as given, else the hub's answer, else,
    where the hub cannot be reached, the hub cache's (module docstring)."""
    wanted = revision or MAIN
    if _COMMIT.fullmatch(wanted):
        return wanted
    where = f"{repo_type} {repo_id!r} revision {wanted!r}"
    if os.environ.get("HF_HUB_OFFLINE", "").lower() not in _TRUE:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

        try:
            return HfApi().repo_info(repo_id, revision=wanted, repo_type=repo_type).sha
        except (RepositoryNotFoundError, RevisionNotFoundError) as err:
            raise ESAError(f"{where}: not on the hub ({type(err).__name__})") from None
        except Exception as err:  # noqa: BLE001 - the transport's own errors (httpx, requests): unreachable
            log.warning("%s: the hub cannot be reached (%s); asking the hub cache", where, type(err).__name__)
    commit = cached_commit(repo_id, wanted, repo_type)
    if commit is None:
        raise ESAError(f"{where}: cannot resolve it to a commit: the hub cannot be reached and the hub cache "
                       f"{hub_cache()} holds no ref for it; give the commit hash, or run where either can answer")
    return commit
