"""Is a file what it claims to be? Cheap checks of the files one stage reads from another (or from a
checkpoint) before anything relies on them: a damaged file is named with the fix instead of surfacing
later as a library's traceback.

- safetensors: the 8-byte header length, the JSON header, and a file size that matches the last
  tensor's end (a truncated file fails here; the format is documented in huggingface/safetensors).
- torch.save files (`.pt`, `.pth`, `.bin`): a complete zip archive (every member's CRC) and no pickled
  global outside torch's `weights_only` allowlist (torch.serialization.get_unsafe_globals_in_checkpoint
  reads the pickle's opcodes without running it), so a crafted payload is refused, not executed.
- JSON: parsed, with the line of the first error.
"""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

from finetune.errors import UserError


class DamagedFileError(UserError):
    """A file that is truncated, corrupt or not what its name says; the message names it and the fix."""


def safetensors_problem(path: str | Path) -> str | None:
    """Why `path` is not a complete safetensors file, or None when it is one."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return f"{size} bytes, shorter than a safetensors header"
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                return f"header of {n} bytes in a file of {size} bytes: truncated or not safetensors"
            header = json.loads(fh.read(n))
    except OSError as e:
        return f"cannot read it ({e.strerror or e})"
    except (ValueError, UnicodeDecodeError):
        return "the header is not valid JSON: corrupt or not safetensors"
    if not isinstance(header, dict):
        return "the header is not a JSON object: corrupt or not safetensors"
    ends = [
        t["data_offsets"][1]
        for k, t in header.items()
        if k != "__metadata__" and isinstance(t, dict) and len(t.get("data_offsets", ())) == 2
    ]
    expected = 8 + n + max(ends, default=0)
    if size != expected:
        return f"{size} bytes where its header describes {expected}: truncated (or extended) after it was written"
    return None


def torch_file_problem(path: str | Path, allowed: tuple = ()) -> str | None:
    """Why `path` is not a complete, weights-only-safe torch.save file, or None. `allowed`: classes
    trusted beyond torch's own allowlist (e.g. DeepSpeed's loss scaler in its optimiser states)."""
    import torch

    path = Path(path)
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
            if bad is not None:
                return f"member {bad} fails its CRC check: corrupt"
        with torch.serialization.safe_globals(list(allowed)):
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except zipfile.BadZipFile:
        return "not a complete torch.save archive (truncated, or written by an old torch.save format)"
    except (OSError, EOFError, ValueError, RuntimeError) as e:
        return f"cannot be read as a torch.save archive ({type(e).__name__}: {e})"
    if unsafe:
        return (
            f"it pickles {', '.join(sorted(unsafe)[:5])}, which a weights-only load refuses (it could run code); "
            "not loaded"
        )
    return None


# What a torch.distributed.checkpoint `.metadata` file (FSDP's sharded checkpoints) may name: DCP's own classes,
# torch's sizes, dtypes and layouts, paths and plain containers. torch reads it with pickle.load (any global could
# run code), so it is first unpickled here with only these allowed, as torch's weights-only loader does for tensors.
DCP_ALLOWED = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
}


def dcp_metadata_problem(path: str | Path) -> str | None:
    """Why a torch.distributed.checkpoint `.metadata` pickle is damaged or names a global outside DCP_ALLOWED,
    DCP's own modules and torch's dtypes, or None."""
    import pickle

    import torch

    class Restricted(pickle.Unpickler):
        def find_class(self, module, name):
            dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
            if (module, name) in DCP_ALLOWED or dtype or module.startswith("torch.distributed.checkpoint."):
                return super().find_class(module, name)
            raise pickle.UnpicklingError(f"it pickles {module}.{name}, which a checkpoint index has no need of")

    try:
        with open(path, "rb") as fh:
            Restricted(fh).load()
    except pickle.UnpicklingError as e:
        return f"{e} (it could run code); not loaded" if "pickles" in str(e) else f"damaged ({e})"
    except (EOFError, OSError, ValueError, TypeError, AttributeError, ImportError) as e:
        return f"damaged ({type(e).__name__}: {e})"
    return None


def read_json(path: str | Path, fix: str):
    """The parsed JSON of `path`; a damaged file is a DamagedFileError naming it and `fix`."""
    path = Path(path)
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DamagedFileError(f"{path}: damaged (not UTF-8 text at byte {e.start}); {fix}") from None
    except json.JSONDecodeError as e:
        raise DamagedFileError(
            f"{path}: damaged (not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}); {fix}"
        ) from None


def check_safetensors(path: str | Path, fix: str) -> None:
    problem = safetensors_problem(path)
    if problem:
        raise DamagedFileError(f"{path}: damaged ({problem}); {fix}")
