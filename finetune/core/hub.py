"""Hub access, said plainly: a local path that does not exist, a hub id with no network, a repo that is
not there. Each becomes one message naming the recipe key, instead of transformers' advice about repo id
syntax or huggingface_hub retrying a dead connection with backoff for most of a minute (measured: 50 s
for `AutoTokenizer.from_pretrained("microsoft/phi-2")` without DNS, then an OSError).

Before the first hub access a run asks once whether the hub answers (a TCP connect to the endpoint with
a short timeout, or HF_HUB_OFFLINE). When it does not, hub loads run in offline mode: a model or dataset
already in the local cache loads from it; one that is not fails at once, with a message that says
"offline" and what to do.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

from finetune.recipe import RecipeError

from . import faults

log = logging.getLogger(__name__)

PROBE_SECONDS = 3.0
# owner/name (or a bare name) as the hub spells repo ids; anything else is a path
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?")


def looks_like_hub_id(name: str) -> bool:
    return bool(HUB_ID.fullmatch(name)) and not name.startswith((".", "/", "~")) and ".." not in name


@functools.cache
def _probe(endpoint: str) -> str | None:
    """None when `endpoint` accepts a TCP connection within PROBE_SECONDS, else why not."""
    url = urlparse(endpoint)
    host, port = url.hostname or endpoint, url.port or (443 if url.scheme == "https" else 80)
    result: list[str | None] = []

    def connect():  # in a thread: name resolution has no timeout of its own
        try:
            socket.create_connection((host, port), timeout=PROBE_SECONDS).close()
            result.append(None)
        except OSError as e:
            result.append(f"cannot reach {host}:{port}: {e.strerror or e}")

    t = threading.Thread(target=connect, daemon=True)
    t.start()
    t.join(PROBE_SECONDS + 1)
    return result[0] if result else f"no answer from {host}:{port} within {PROBE_SECONDS:.0f}s"


def offline_reason() -> str | None:
    """Why the hub cannot be used now, or None when it answers."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    return _probe(constants.ENDPOINT)


@contextlib.contextmanager
def _offline(on: bool):
    """huggingface_hub (and datasets) in offline mode for the block: cached files only, no retries."""
    if not on:
        yield
        return
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        import datasets.config as dsc
    except ImportError:
        dsc = None
    ds_saved = getattr(dsc, "HF_HUB_OFFLINE", None)
    if dsc is not None:
        dsc.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved
        if dsc is not None:
            dsc.HF_HUB_OFFLINE = ds_saved


def check_local_model(name: str, resolved: str, source: str) -> None:
    """A model.name_or_path that is a path (not a hub id) must be an existing folder."""
    if Path(resolved).expanduser().is_dir() or looks_like_hub_id(name):
        return
    raise RecipeError(
        f"{source}: model.name_or_path: {name}: no such folder (a path, not a hub id: relative paths are looked up "
        "beside the recipe, then in the current folder); fix the path, or give a hub id such as microsoft/phi-2"
    )


@contextlib.contextmanager
def hub_load(key: str, name: str, source: str, error=RecipeError):
    """Around a from_pretrained / load_dataset of `name` (the value of recipe key `key`): offline, it runs in
    offline mode (the cache or an immediate failure); a failure to find or fetch it becomes one `error`
    naming the key and the fix."""
    from huggingface_hub.errors import HFValidationError

    hub = looks_like_hub_id(name) and not Path(name).exists()
    reason = offline_reason() if hub else None
    if reason and hub:
        log.info("the hub is offline (%s): %s loads from the local cache only", reason, name)
    try:
        with _offline(reason is not None):
            yield
    except (OSError, ConnectionError, HFValidationError) as e:
        if faults.describe(e, Path.cwd()) is not None:
            raise  # a full disk, read-only or forbidden folder (e.g. the cache): reported as such by the stage
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        if reason:
            raise error(
                f"{source}: {key}: {name} is a hub id and the hub is offline ({reason}); it is not in the local cache. "
                "Download it where there is network (`hf download` for models), then copy the cache or point "
                f"{key} at a local copy"
            ) from None
        if hub:
            raise error(
                f"{source}: {key}: cannot load {name} from the hub ({first}); check the id (and a gated repo's access "
                f"token: `hf auth login`), or point {key} at a local copy"
            ) from None
        raise error(f"{source}: {key}: cannot load {name} ({first})") from None
