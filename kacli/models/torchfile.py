"""Reading a PyTorch file that may come from anywhere: tensors and plain data only.

:func:`torch_load_untrusted` is how every checkpoint and weights file is read (a kacli checkpoint,
a backbone's weights, a DETR checkpoint to import). It imports nothing else of kacli's models, so
the backbone, the checkpoint format and the importers all stand on it.
"""

from __future__ import annotations

import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from kacli.errors import KacliError


def torch_load_untrusted(path: str | Path, what: str = "checkpoint") -> Any:
    """``torch.load(weights_only=True)`` with one line of ours for every file that is not a
    readable PyTorch file of tensors and plain data (``what`` names it: checkpoint, weights file).

    The first bytes say what the file is before torch reads it: a zip archive (torch's format;
    a truncated one is said to be so), a pickle (torch's legacy format, read by the same safe
    unpickler, with its warnings silenced), or neither (random bytes, text). A pickle that names
    code (``GLOBAL module.name``) is refused without running anything."""
    p = Path(path)
    if not p.exists():
        raise KacliError(f"{what} not found", p)
    if p.is_dir():
        raise KacliError(f"is a folder, expected a {what} file", p)
    with open(p, "rb") as f:
        head = f.read(4)
    zipped = head.startswith(b"PK\x03\x04")
    pickled = len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5
    if not (zipped or pickled):
        kind = "an empty file" if not head else "neither a zip archive nor a pickle"
        raise KacliError(f"not a PyTorch {what} file ({kind})", p)
    if zipped and not zipfile.is_zipfile(p):
        raise KacliError(f"truncated or damaged {what} file (its zip archive has no central directory)", p)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        code = re.search(r"GLOBAL ([\w.]+)", str(e))
        if code:
            raise KacliError(
                f"refusing to load: the file needs code to unpickle ({code.group(1)}); "
                "only tensors and plain data are accepted", p,
            ) from None
        fmt = "pickle" if pickled else "zip archive"
        raise KacliError(f"not a PyTorch {what} file (a {fmt} the safe unpickler cannot read)", p) from None
    except Exception as e:  # untrusted bytes: the reader fails in many ways (struct.error, KeyError, ...)
        raise KacliError(f"truncated or damaged {what} file ({type(e).__name__} while reading it)", p) from None


__all__ = ["torch_load_untrusted"]
