"""The sequences a teacher gives, by name: ``proj`` (the projected backbone sequence) and
``enc1`` … ``encL`` (the encoder layers' outputs).

:func:`layer_names` reads a ``--layers`` choice; :func:`layer_outputs` picks the named tensors
from a model's output (a teacher DETR's or the student's).
"""

from __future__ import annotations

from typing import Sequence

import torch

from kacli.errors import KacliError


def layer_names(spec: str | Sequence[str], enc_layers: int) -> list[str]:
    """``all`` → ``['proj', 'enc1', ..., 'encL']``; ``'proj,1,3'`` (or ``enc3``) → those, in that canonical order."""
    if isinstance(spec, str):
        parts = [p.strip() for p in spec.split(",") if p.strip()]
    else:
        parts = [str(p).strip() for p in spec]
    if not parts:
        raise KacliError("--layers is empty (use 'all' or e.g. 'proj,1,3')")
    if parts == ["all"]:
        return ["proj"] + [f"enc{i}" for i in range(1, enc_layers + 1)]
    picked: set[int] = set()
    for p in parts:
        if p == "proj":
            picked.add(0)
            continue
        num = p[3:] if p.startswith("enc") else p
        if not num.isdigit() or not 1 <= int(num) <= enc_layers:
            raise KacliError(
                f"--layers: {p!r} is not 'all', 'proj' or an encoder layer 1..{enc_layers} (teachers have {enc_layers})"
            )
        if int(num) in picked:
            raise KacliError(f"--layers names layer {p!r} twice")
        picked.add(int(num))
    return ["proj" if i == 0 else f"enc{i}" for i in sorted(picked)]


def layer_outputs(out: dict, layers: Sequence[str]) -> list[torch.Tensor]:
    """The model output's tensors for the layer names: ``proj`` → ``enc_proj``, ``encI`` →
    ``enc_layers[I-1]`` (None where a teacher does not give that layer: an RT-DETR hybrid encoder).

    A compressed student's ``proj`` is all N projected parts (``proj_parts``, B×N×n×d), not only the
    kept tokens: compression happens after the projection, so the whole extended X_S exists, and at
    evaluation the kept parts are chosen from X_S's redundancy. Supervising only the kept tokens
    leaves the others free, and a selection made from them disagrees with the teachers' one the
    student was trained on (docs/DEMO.md, "Design decisions")."""
    picked = []
    for name in layers:
        if name == "proj":
            picked.append(out.get("proj_parts", out["enc_proj"]))
        elif name.startswith("enc") and name[3:].isdigit():
            picked.append(out["enc_layers"][int(name[3:]) - 1])
        else:
            raise ValueError(f"unknown cached layer name {name!r}")
    return picked


__all__ = ["layer_names", "layer_outputs"]
