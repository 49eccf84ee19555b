"""Publishing an exported folder to the Hugging Face Hub (`finetune export ... --push-to-hub REPO_ID`).

The folder is uploaded as it is (weights, tokenizer with the chat template, generation config, model
card, metrics, recipe) with huggingface_hub: the repository is created private unless asked
(`export.hub_private: false`), the token comes from HF_TOKEN or `hf auth login`. Before anything is
sent it checks, quickly, what would otherwise fail slowly or half-way: offline mode, a token, and that
the hub answers at all (a few seconds, not a hang on an unroutable network). A failure is one message;
the local export is never touched.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from finetune.errors import UserError

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 3.0


class PublishError(UserError):
    """The upload could not happen; the message says why and how to push the kept export later."""


def _later(folder: Path, repo_id: str, private: bool) -> str:
    flag = " --private" if private else ""
    return (
        f"The export in {folder} is complete and untouched; push it later with "
        f"`hf upload {repo_id} {folder} .{flag}` or by rerunning the export with --push-to-hub."
    )


def endpoint() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT") or constants.ENDPOINT


def preflight(folder: Path, repo_id: str, private: bool) -> str:
    """The token to upload with, after the fast checks (offline mode, a token, the hub reachable)."""
    from huggingface_hub import constants, get_token

    later = _later(folder, repo_id, private)
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    if offline or constants.HF_HUB_OFFLINE:
        raise PublishError(f"Cannot push to the Hugging Face Hub: HF_HUB_OFFLINE is set. {later}")
    token = os.environ.get("HF_TOKEN") or get_token()
    if not token:
        raise PublishError(
            "Cannot push to the Hugging Face Hub: no token. Set HF_TOKEN (a write token from "
            f"https://huggingface.co/settings/tokens) or run `hf auth login`. {later}"
        )
    url = urlparse(endpoint())
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as e:
        raise PublishError(
            f"Cannot push to the Hugging Face Hub: {url.scheme}://{url.hostname}:{port} did not answer within "
            f"{CONNECT_TIMEOUT_S:.0f}s ({type(e).__name__}: {e}); check the network or HF_ENDPOINT. {later}"
        ) from None
    return token


def push_folder(folder: Path, repo_id: str, private: bool = True) -> str:
    """Create (or reuse) the model repository and upload `folder` as one commit; returns the repo URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    folder = Path(folder)
    token = preflight(folder, repo_id, private)
    api = HfApi(endpoint=endpoint(), token=token)
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        log.info("pushing %s to %s (%s)", folder, url, "private" if private else "public")
        api.upload_folder(
            repo_id=repo_id,
            repo_type="model",
            folder_path=str(folder),
            commit_message=f"finetune export: {folder.name}",
        )
    except (HfHubHTTPError, OSError) as e:
        reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise PublishError(f"Pushing to {repo_id} failed ({reason}). {_later(folder, repo_id, private)}") from None
    return str(url)
