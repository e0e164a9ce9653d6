"""The extended student (Sec. III-B, Fig. 2): one backbone, N input projections, one transformer.

Projection k maps the backbone features to the student's part k, ``X_s^k (n × d)``, which teacher k
supervises. All N parts share the positional encoding and the padding mask.

Decoupled encoder (Eq. 3–4). The paper runs the concatenated sequence ``X_S = X_s^1 ⊕ … ⊕ X_s^N``
with a block-diagonal attention mask, so part k only attends to part k. Attention is the only
place tokens mix, so that is exactly the encoder run on the N parts as N separate sequences: the
part axis is folded into the batch axis, ``(B, N, n, d) → (B·N, n, d)``, with the mask and the
positional encoding repeated. The cost is linear in N (a dense masked attention is quadratic);
``dense_oracle=True`` keeps the masked path for tests. The decoder reads the concatenated memory
``(B, N·n, d)`` (part k's tokens at ``k·n … k·n + n − 1``) with the repeated mask and encoding.

Compression (Alg. 1): with ``compress`` ≠ ``none`` the student keeps, for every position i, the
i-th token of one part (:func:`kacli.models.compress.select_parts`), so the encoder and the
decoder run on n tokens — the cost of a plain DETR plus N − 1 extra 1×1 projections. Training picks
the parts from the teachers' projected sequences when given them (``teacher_proj``), otherwise
(and always at evaluation) from the student's own; ``random`` uses a generator seeded with
``seed`` at evaluation, so it is deterministic.

With N = 1 and no compression the student computes exactly what :class:`~kacli.models.detr.DETR`
does (its ``enc_*`` outputs carry a part axis of size 1).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from kacli.errors import KacliError
from kacli.models.compress import COMPRESSION_METHODS, gather_parts, select_parts
from kacli.models.config import ModelConfig
from kacli.models.detr import DETR

STUDENT_FIELDS = ("num_parts", "compress", "seed")
PROJ_INITS = ("independent", "copies")


def block_diagonal_mask(num_parts: int, n: int, device=None) -> torch.Tensor:
    """Bool ``(N·n, N·n)`` attention mask, True = not allowed: token i of part a may attend to
    token j of part b only when a == b (the paper's block-diagonal mask)."""
    part = torch.arange(num_parts * n, device=device) // n
    return part[:, None] != part[None, :]


class Student(DETR):
    """DETR with ``num_parts`` input projections ``input_projs`` and a decoupled encoder.

    Args:
        cfg: the architecture (d_model and enc_layers must equal the teachers').
        num_classes: C, the union label set's size (class C is "no object").
        num_parts: N, the number of teachers (≥ 1).
        compress: ``none``, ``redundancy``, ``isometric`` or ``random``; N = 1 allows only ``none``.
        seed: seed of ``random`` compression at evaluation.
        proj_init: ``independent`` (default): every part's projection gets its own random
            initialisation (part 0 keeps DETR's, so N = 1 is DETR exactly), as the official code's
            one projection to N·d channels; ``copies``: all N start as copies of one. Copies stay
            identical when nothing part-specific supervises them (``raw-ext``, TA without SA): every
            part then gets the same input, gradient and update, and the extended student computes
            raw DETR's function.

    Raises:
        KacliError: an unknown compression method, N < 1, or compression with N = 1.
    """

    def __init__(self, cfg: ModelConfig, num_classes: int, num_parts: int, compress: str = "none", seed: int = 0,
                 proj_init: str = "independent"):
        if isinstance(num_parts, bool) or not isinstance(num_parts, int) or num_parts < 1:
            raise KacliError(f"the student needs at least one part (one per teacher), got {num_parts!r}")
        if compress not in COMPRESSION_METHODS:
            raise KacliError(f"unknown compression {compress!r} (use {', '.join(COMPRESSION_METHODS)})")
        if compress != "none" and num_parts == 1:
            raise KacliError(
                f"compression {compress!r} needs at least 2 parts (teachers); with one part there is nothing to compress"
            )
        if proj_init not in PROJ_INITS:
            raise KacliError(f"unknown projection initialisation {proj_init!r} (use {', '.join(PROJ_INITS)})")
        super().__init__(cfg, num_classes)
        proj = self.input_proj
        del self.input_proj
        if proj_init == "copies":
            extra = [copy.deepcopy(proj) for _ in range(num_parts - 1)]
        else:
            extra = [nn.Conv2d(proj.in_channels, proj.out_channels, kernel_size=1) for _ in range(num_parts - 1)]
        self.input_projs = nn.ModuleList([proj, *extra])
        self.num_parts = num_parts
        self.compress = compress
        self.seed = int(seed)

    # -- (de)serialisation ------------------------------------------------------------------

    def arch_dict(self) -> dict[str, Any]:
        """ModelConfig fields plus ``num_parts``, ``compress`` and ``seed`` (a checkpoint's ``arch``)."""
        d = self.cfg.to_dict()
        d.update(num_parts=self.num_parts, compress=self.compress, seed=self.seed)
        return d

    @classmethod
    def from_arch(cls, arch: Mapping[str, Any], num_classes: int, path=None) -> "Student":
        """Build from :meth:`arch_dict`'s output; unknown or missing fields are a KacliError."""
        if not isinstance(arch, Mapping):
            raise KacliError("student architecture must be a mapping", path)
        missing = [k for k in ("num_parts",) if k not in arch]
        if missing:
            raise KacliError(f"student architecture lacks {', '.join(missing)}", path)
        model_keys = {f.name for f in dataclasses.fields(ModelConfig)}
        extra = {k: arch[k] for k in arch if k not in model_keys}
        unknown = sorted(str(k) for k in extra if k not in STUDENT_FIELDS)
        if unknown:
            raise KacliError(f"unknown student architecture key(s) {', '.join(unknown)}", path)
        cfg = ModelConfig.from_dict({k: v for k, v in arch.items() if k in model_keys}, path)
        return cls(cfg, num_classes, int(extra["num_parts"]), str(extra.get("compress", "none")),
                   int(extra.get("seed", 0)))

    # -- pieces -------------------------------------------------------------------------------

    def project(self, feat: torch.Tensor) -> torch.Tensor:
        """Backbone features ``(B, C, h, w)`` → the N projected parts ``(B, N, n, d)``, row-major
        tokens. The N 1×1 convolutions run as one convolution with N·d output channels."""
        weight = torch.cat([p.weight for p in self.input_projs])  # (N·d, C, 1, 1)
        bias = torch.cat([p.bias for p in self.input_projs])
        out = F.conv2d(feat, weight, bias)  # (B, N·d, h, w)
        B, _, h, w = out.shape
        return out.view(B, self.num_parts, -1, h * w).transpose(2, 3)

    def select(self, parts: torch.Tensor, mask: torch.Tensor, teacher_proj: torch.Tensor | None) -> torch.Tensor:
        """The part kept at every position, ``(B, n)`` int64 (see the module docstring).

        ``parts`` (B,N,n,d) are the student's projections, ``teacher_proj`` (B,N,n,d) the
        teachers' (or None), ``mask`` (B,n) True=pad."""
        source = parts.detach() if teacher_proj is None else teacher_proj
        if source.shape != parts.shape:
            raise ValueError(f"teacher_proj {tuple(source.shape)} does not match the student's parts {tuple(parts.shape)}")
        generator = None
        if self.compress == "random" and not self.training:
            generator = torch.Generator(device=parts.device).manual_seed(self.seed)
        return select_parts(source, mask, self.compress, generator)

    def encode_parts(self, parts: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        """The decoupled encoder: parts ``(B, N, n, d)``, pos ``(B, n, d)``, mask ``(B, n)`` →
        list of ``(B, N, n, d)``, one per encoder layer (part axis folded into the batch)."""
        B, N, n, d = parts.shape
        src = parts.reshape(B * N, n, d)
        pos_r = pos[:, None].expand(B, N, n, d).reshape(B * N, n, d)
        mask_r = mask[:, None].expand(B, N, n).reshape(B * N, n)
        return [y.view(B, N, n, d) for y in self.transformer.encoder(src, pos_r, mask_r)]

    def encode_parts_dense(self, parts: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        """Test oracle of :meth:`encode_parts`: the concatenated ``(B, N·n, d)`` sequence with the
        block-diagonal attention mask (quadratic in N)."""
        B, N, n, d = parts.shape
        attn = block_diagonal_mask(N, n, parts.device)
        outs = self.transformer.encoder(parts.reshape(B, N * n, d), pos.repeat(1, N, 1), mask.repeat(1, N), attn)
        return [y.view(B, N, n, d) for y in outs]

    # -- whole model --------------------------------------------------------------------------

    def forward(
        self,
        images: torch.Tensor,
        mask: torch.Tensor,
        teacher_proj: torch.Tensor | None = None,
        dense_oracle: bool = False,
    ) -> dict:
        """images (B,3,H,W), mask (B,H,W) True=pad → dict:

        - ``pred_logits`` (B,Q,C+1), ``pred_boxes`` (B,Q,4), ``aux_outputs``: as DETR's;
        - ``enc_mask`` (B,n) True=pad, ``enc_hw`` (h, w);
        - uncompressed: ``enc_proj`` (B,N,n,d) and ``enc_layers`` (list of (B,N,n,d)): part k is
          the sequence teacher k supervises;
        - compressed: ``enc_proj`` (B,n,d), ``enc_layers`` (list of (B,n,d)), ``part_idx`` (B,n)
          (the part kept at each position), ``proj_parts`` (B,N,n,d) (all N projections).

        Args:
            teacher_proj: ``(B, N, n, d)`` the teachers' projected sequences, which choose the
                kept parts when compressing (training); None: the student's own (evaluation).
            dense_oracle: run the uncompressed encoder as one masked sequence (tests only).
        """
        feat, fmask = self.backbone_features(images, mask)
        h, w = feat.shape[-2:]
        parts = self.project(feat)  # (B, N, n, d)
        pos = self.positional(fmask)  # (B, n, d)
        tok_mask = fmask.flatten(1)  # (B, n)
        B, N, n, d = parts.shape
        if self.compress != "none":
            if dense_oracle:
                raise ValueError("dense_oracle is the uncompressed encoder's test oracle; this student compresses")
            idx = self.select(parts, tok_mask, teacher_proj)
            src = gather_parts(parts, idx)  # (B, n, d)
            enc = self.transformer.encoder(src, pos, tok_mask)
            out = self.decode(enc[-1], tok_mask, pos)
            out.update(enc_proj=src, enc_layers=enc, enc_mask=tok_mask, enc_hw=(h, w), part_idx=idx, proj_parts=parts)
            return out
        enc = (self.encode_parts_dense if dense_oracle else self.encode_parts)(parts, pos, tok_mask)
        memory = enc[-1].reshape(B, N * n, d)  # part-major concatenation
        out = self.decode(memory, tok_mask.repeat(1, N), pos.repeat(1, N, 1))
        out.update(enc_proj=parts, enc_layers=enc, enc_mask=tok_mask, enc_hw=(h, w))
        return out
