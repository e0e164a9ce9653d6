"""Foreign DETR checkpoints → kacli: facebookresearch/detr, UP-DETR, Atten4Vis/ConditionalDETR and
HF transformers (DETR and Conditional DETR).

Supported sources (read without running any code from the file):

- facebookresearch/detr and UP-DETR: ``{"model": state_dict, ...}`` or a bare state dict, from
  ``torch.load(weights_only=True)``. An ``args`` entry (an ``argparse.Namespace``, allowed as the one
  non-tensor class) supplies ``nheads``, ``dilation``, ``dropout``. Keys are ours except
  ``backbone.0.body.*`` (ours: ``backbone.body.*``); a ``detr.`` prefix (DETRsegm) and a
  ``module.`` prefix (DDP) are stripped. Pre-norm is detected from ``transformer.encoder.norm.*``
  (DETR builds that norm only with ``normalize_before``). Pretraining-only keys (UP-DETR's
  ``patch2query``, ``feature_align``; DETRsegm's ``bbox_attention``, ``mask_head``) are ignored and
  listed.
- HF transformers ``DetrForObjectDetection`` state dicts: ``pytorch_model.bin`` or
  ``model.safetensors`` (read by :func:`read_safetensors`, no extra package), a file or a model
  folder. A ``config.json`` beside it supplies ``encoder_attention_heads``, ``dilation`` and
  ``id2label``. Both key generations are read:

  ========================================  ============================================  =========================
  transformers v4                           transformers v5                               kacli
  ========================================  ============================================  =========================
  model.backbone.conv_encoder.model.*       model.backbone.model.*                        backbone.body.*
  model.input_projection.*                  same                                          input_proj.*
  model.query_position_embeddings.weight    same                                          query_embed.weight
  model.encoder.layers.i.self_attn.         same                                          transformer.encoder.layers.i.
  {q,k,v}_proj.*                                                                          self_attn.in_proj_* (packed q;k;v)
  …self_attn.out_proj.*                     …self_attn.o_proj.*                           …self_attn.out_proj.*
  …self_attn_layer_norm.*                   same                                          …norm1.*
  …fc1.*, …fc2.*                            …mlp.fc1.*, …mlp.fc2.*                        …linear1.*, …linear2.*
  …final_layer_norm.* (encoder / decoder)   same                                          …norm2.* / …norm3.*
  …encoder_attn.{q,k,v}_proj / out_proj     …encoder_attn.{q,k,v}_proj / o_proj           …multihead_attn.*
  …encoder_attn_layer_norm.*                same                                          …norm2.*
  model.decoder.layernorm.*                 same                                          transformer.decoder.norm.*
  class_labels_classifier.*                 same                                          class_embed.*
  bbox_predictor.layers.{0,1,2}.*           same                                          bbox_embed.layers.{0,1,2}.*
  ========================================  ============================================  =========================

  The backbone may use timm names (``conv1``, ``layer1.0.bn1``: torchvision's) or HF ResNet names
  (``embedder.embedder.convolution``, ``encoder.stages.s.layers.b.layer.j.convolution``,
  ``…shortcut.*``), which are renamed to torchvision's. A ``detr.`` prefix (DetrForSegmentation)
  is stripped; HF's learned position embeddings and a bare ``DetrModel`` without heads are not
  importable (``--init`` still loads what fits from the latter).
- Conditional DETR (arch ``conditional``, :mod:`kacli.models.conditional`), told from DETR by its
  decoder's keys (``ref_point_head``, ``query_scale``, ``sa_*`` / ``ca_*`` projections):

  - Atten4Vis/ConditionalDETR ``.pth``: ``{"model": state_dict, "args": ...}`` as DETR's; kacli's
    names are the official ones (``transformer.decoder.layers.i.sa_qcontent_proj`` …,
    ``ca_qpos_proj`` in layer 0 only, ``cross_attn.out_proj``, ``transformer.decoder.query_scale``,
    ``ref_point_head``), ``backbone.0.body.*`` aside.
  - HF ``ConditionalDetrForObjectDetection`` (``save_pretrained`` folder: ``config.json`` with
    ``model_type: conditional_detr`` + ``model.safetensors`` or ``pytorch_model.bin``). Backbone,
    input projection, queries, encoder and heads are named as DETR's above; the decoder layers:

    ==========================================  ==========================================  ======================
    transformers v4                             transformers v5                             kacli (official)
    ==========================================  ==========================================  ======================
    sa_{qcontent,qpos,kcontent,kpos,v}_proj     self_attn.{q_content,q_pos,k_content,       sa_*_proj
                                                k_pos,v}_proj
    ca_{qcontent,qpos,kcontent,kpos,v,          encoder_attn.{q_content,q_pos,k_content,    ca_*_proj
    qpos_sine}_proj                             k_pos,v,q_pos_sine}_proj
    self_attn.out_proj / encoder_attn.out_proj  self_attn.o_proj / encoder_attn.o_proj      self_attn.out_proj /
                                                                                            cross_attn.out_proj
    self_attn_layer_norm, encoder_attn_layer_   same; mlp.fc1, mlp.fc2                      norm1, norm2, norm3,
    norm, final_layer_norm, fc1, fc2                                                        linear1, linear2
    model.decoder.{layernorm,query_scale,       same                                        transformer.decoder.
    ref_point_head}                                                                         {norm,query_scale,…}
    ==========================================  ==========================================  ======================

    transformers computes the official decoder only with ``auxiliary_loss: false`` (its default,
    and that of the published checkpoints); with ``true`` it feeds every decoder layer the previous
    layer's normalised output instead. kacli computes the official decoder, and the import report
    carries a note when config.json says ``true``.

A state dict whose encoder or decoder holds a tensor neither DETR nor Conditional DETR has
(Deformable DETR's sampling offsets, DAB-DETR's anchor heads …) is refused, naming that tensor.

Architecture inferred from the tensors: ResNet depth from the block counts (layer3: 2/6 basic
blocks → resnet18/34, 6/23 bottlenecks → resnet50/101), d_model, encoder/decoder layers, FFN
width, queries, pre-norm. Not visible in the weights and taken from ``args`` / ``config.json``
when present, else from the caller (``--heads``, ``--dilation``), else DETR's defaults: 8 heads,
no dilation (DC5 checkpoints need ``--dilation`` unless their ``args`` say so).

Label maps follow DETR's convention: class index k of the checkpoint *is* category id k. The map
(``coco``, or a YAML/JSON file: a list of ``{id, name}``, a mapping ``{id: name}``, or an HF
``config.json`` with ``id2label``) names the slots to keep; every id must be a class slot of the
checkpoint (``id < K``, the head having K+1 outputs; Conditional DETR's sigmoid head K, e.g. 91
for COCO). Slots without a name (or named ``N/A``) are
dropped from the class head — for COCO the 11 unused ids of DETR's 91 — so the kacli label map
holds real categories only. The unnamed slots' outputs stay in the head, after "no object"
(``ModelConfig.unnamed_classes``): they count in the softmax's normalisation, folded into "no
object", so every score (and AP) equals DETR's own post-processing (softmax over all K+1
logits, "no object" dropped, max), and no unnamed slot is ever predicted. (A query whose best
slot is unnamed, which DETR reports under an id no dataset has, is reported here as its best named
class at that class's probability.) Boxes are unchanged.

A sigmoid head (Conditional DETR) has no "no object" and no normalisation across classes: its
unnamed slots' rows are removed from ``class_embed``, so the kacli head has the named classes only
(``unnamed_classes`` stays 0). Every named class keeps its own score, bit for bit; the top-100
(query, class) post-processing then ranks the named pairs only, so kacli's 100 detections are the
official post-processing's with the unnamed-id pairs (never a real category) left out and the next
named pairs in their place.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from kacli.errors import KacliError
from kacli.fsutil import check_output_file, load_json, load_yaml, sha256_file
from kacli.models.checkpoint import FORMAT, resolve_checkpoint_path, save_checkpoint
from kacli.models.config import ModelConfig
from kacli.models.detr import DETR
from kacli.models.torchfile import torch_load_untrusted

# fmt: off
#: DETR's 91 COCO class slots: entry k is the name of COCO category id k ("N/A": unused id).
COCO_NAMES: tuple[str, ...] = (
    "N/A", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "N/A", "stop sign", "parking meter", "bench", "bird", "cat",
    "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "N/A", "backpack",
    "umbrella", "N/A", "N/A", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
    "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "N/A", "wine glass", "cup", "fork", "knife", "spoon", "bowl",
    "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut",
    "cake", "chair", "couch", "potted plant", "bed", "N/A", "dining table", "N/A", "N/A",
    "toilet", "N/A", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave",
    "oven", "toaster", "sink", "refrigerator", "N/A", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)
# fmt: on
UNNAMED = "N/A"

#: Key prefixes of a DETR model in kacli (and facebookresearch/detr, after backbone.0.body → backbone.body).
KNOWN_PREFIXES = (
    "backbone.body.", "input_proj.", "transformer.encoder.", "transformer.decoder.",
    "query_embed.", "class_embed.", "bbox_embed.",
)  # fmt: skip

LAYOUT_DETR = "facebookresearch/detr"
LAYOUT_HF = "hf-transformers"
LAYOUT_COND = "Atten4Vis/ConditionalDETR"
LAYOUT_HF_COND = "hf-transformers-conditional"
LAYOUT_KACLI = "kacli"
#: The layouts whose weights are Conditional DETR's (arch ``conditional``).
CONDITIONAL_LAYOUTS = (LAYOUT_COND, LAYOUT_HF_COND)
#: config.json's ``model_type`` of each HF layout.
_HF_MODEL_TYPES = {LAYOUT_HF: "detr", LAYOUT_HF_COND: "conditional_detr"}


# ---------------------------------------------------------------------------------- reading


_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file: an 8-byte little-endian header length, a JSON header
    ``{name: {dtype, shape, data_offsets: [begin, end]}}`` and the raw little-endian bytes."""
    p = Path(path)
    data = p.read_bytes()
    bad = KacliError("not a readable safetensors file", p)
    if len(data) < 8:
        raise bad
    n = int.from_bytes(data[:8], "little")
    if n < 2 or 8 + n > len(data):
        raise bad
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise bad from None
    if not isinstance(header, dict):
        raise bad
    body = memoryview(data)[8 + n :]
    out: dict[str, torch.Tensor] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _ST_DTYPES[info["dtype"]]
            shape = [int(s) for s in info["shape"]]
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise KacliError(f"safetensors entry {name!r} is malformed", p) from None
        count = 1
        for s in shape:
            count *= s
        itemsize = torch.empty((), dtype=dtype).element_size()
        if not 0 <= begin <= end <= len(body) or end - begin != count * itemsize:
            raise KacliError(f"safetensors entry {name!r} has inconsistent offsets", p)
        buf = bytearray(body[begin:end])
        t = torch.frombuffer(buf, dtype=dtype) if count else torch.empty(0, dtype=dtype)
        out[name] = t.reshape(shape)
    return out


def _hf_config_beside(p: Path) -> dict | None:
    """The ``config.json`` beside HF weights (any model type: the importer keeps it only when its
    ``model_type`` is the weights' own, see :func:`_hf_config_for`)."""
    cfg = (p if p.is_dir() else p.parent) / "config.json"
    if not cfg.is_file():
        return None
    data = load_json(cfg)
    return data if isinstance(data, dict) else None


def _hf_config_for(layout: str, hf_config: Mapping | None) -> Mapping | None:
    """``hf_config`` when it describes weights of ``layout`` (its ``model_type`` absent or the
    layout's: ``detr`` / ``conditional_detr``), else None."""
    want = _HF_MODEL_TYPES.get(layout)
    if want is None or not hf_config or hf_config.get("model_type") not in (None, want):
        return None
    return hf_config


def _load_file(p: Path) -> Any:
    if p.suffix == ".safetensors":
        return read_safetensors(p)
    # DETR's training checkpoints carry their argparse.Namespace: plain attributes, safe to allow.
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch_load_untrusted(p)


def read_source(src: str | Path) -> tuple[Any, dict]:
    """Load a checkpoint file, a kacli run folder or an HF model folder without running code from it.

    Returns ``(obj, meta)``: the loaded object (a dict) and ``{"path", "hf_config"}``.
    """
    p = Path(src)
    if not p.exists():
        raise KacliError("checkpoint not found", p)
    if p.is_dir() and any((p / n).is_file() for n in ("best.pt", "last.pt")):
        p = resolve_checkpoint_path(p)  # a kacli run folder
    if p.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (p / name).is_file():
                weights = p / name
                break
        else:
            raise KacliError("folder holds no model.safetensors or pytorch_model.bin", p)
    else:
        weights = p
    obj = _load_file(weights)
    return obj, {"path": weights, "hf_config": _hf_config_beside(p)}


def _args_dict(args: Any) -> dict:
    if isinstance(args, argparse.Namespace):
        return dict(vars(args))
    return dict(args) if isinstance(args, Mapping) else {}


def extract_state_dict(obj: Any, path: str | Path | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """The state dict inside a loaded checkpoint (``{"model": ...}``, ``{"state_dict": ...}`` or
    bare) and DETR's training ``args`` (``{}`` when absent). A ``module.`` prefix is removed."""
    args: dict = {}
    sd = obj
    if isinstance(obj, Mapping):
        for wrapper in ("model", "state_dict"):
            if isinstance(obj.get(wrapper), Mapping):
                sd = obj[wrapper]
                args = _args_dict(obj.get("args"))
                break
    if (
        not isinstance(sd, Mapping)
        or not sd
        or not all(isinstance(k, str) for k in sd)
        or not any(isinstance(v, torch.Tensor) for v in sd.values())
    ):
        raise KacliError(
            "not a checkpoint: expected a state dict (parameter names → tensors) or {'model': state dict}", path
        )
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd, args


# ---------------------------------------------------------------------------------- conversion


_COND_SUBKEY = r"((sa|ca)_\w+_proj|(self_attn|encoder_attn)\.(q_content|q_pos|k_content|k_pos|q_pos_sine)_proj)"


def detect_layout(sd: Mapping[str, torch.Tensor]) -> str:
    """``facebookresearch/detr`` (also kacli's own names), ``Atten4Vis/ConditionalDETR`` (also kacli's
    Conditional DETR), ``hf-transformers`` (``DetrForObjectDetection``),
    ``hf-transformers-conditional`` (``ConditionalDetrForObjectDetection``), or a KacliError.

    Conditional DETR is told from DETR by its decoder: ``ref_point_head``, ``query_scale`` or the
    separate content/position projections (``sa_qcontent_proj`` …; transformers v5:
    ``self_attn.q_content_proj`` …)."""
    keys = list(sd)

    def has(pattern: str) -> bool:
        rx = re.compile(pattern)
        return any(rx.search(k) for k in keys)

    official = has(r"(^|\.)transformer\.(encoder|decoder)\.layers\.\d+\.") or has(r"(^|\.)backbone\.0\.body\.")
    if official:
        conditional = has(rf"(^|\.)transformer\.decoder\.(ref_point_head|query_scale|layers\.\d+\.{_COND_SUBKEY})\.")
        return LAYOUT_COND if conditional else LAYOUT_DETR
    if has(r"(^|\.)(encoder|decoder)\.layers\.\d+\.(self_attn|encoder_attn)\.[qkv]_proj\.") or has(
        r"(^|\.)(class_labels_classifier|input_projection|query_position_embeddings)\."
    ) or has(rf"(^|\.)decoder\.layers\.\d+\.{_COND_SUBKEY}\."):
        conditional = has(rf"(^|\.)decoder\.(ref_point_head|query_scale|layers\.\d+\.{_COND_SUBKEY})\.")
        return LAYOUT_HF_COND if conditional else LAYOUT_HF
    raise KacliError(
        "not a DETR or Conditional DETR state dict (no facebookresearch/detr, Atten4Vis/ConditionalDETR or "
        f"HF transformers keys; it has e.g. {', '.join(sorted(keys)[:3])})"
    )


def _strip_wrapper(sd: dict[str, torch.Tensor], core: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Remove a ``detr.`` / ``conditional_detr.`` prefix (segmentation wrappers) when the core keys sit under it."""
    if any(k.startswith(core) for k in sd):
        return sd
    for wrapper in ("detr.", "conditional_detr."):  # DETRsegm / DetrForSegmentation, ConditionalDetrForSegmentation
        if any(k.startswith(wrapper) for k in sd):
            return {(k[len(wrapper):] if k.startswith(wrapper) else k): v for k, v in sd.items()}
    return sd


def _convert_detr(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    sd = _strip_wrapper(sd, ("backbone.0.body.", "transformer.", "backbone.body."))
    if any(k.startswith("backbone.1.") for k in sd) or "transformer.row_embed" in sd:
        raise KacliError("learned position embeddings are not supported (kacli uses DETR's sine encoding)")
    out: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    for k, v in sd.items():
        nk = "backbone.body." + k[len("backbone.0.body."):] if k.startswith("backbone.0.body.") else k
        if nk.endswith("num_batches_tracked") or not nk.startswith(KNOWN_PREFIXES):
            ignored.append(k)
        else:
            out[nk] = v
    return out, ignored


_TV_NAME = re.compile(r"^(conv1|bn1|layer[1-4]\.\d+\.(conv[1-3]|bn[1-3]|downsample\.[01]))\.")
_HF_STEM = re.compile(r"^embedder\.embedder\.(convolution|normalization)\.(.+)$")
_HF_BLOCK = re.compile(
    r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.(?:shortcut|layer\.(\d+))\.(convolution|normalization)\.(.+)$"
)


def _hf_backbone_name(rest: str) -> str | None:
    """A timm (= torchvision) or HF ResNet backbone parameter name → torchvision's; None if unknown.

    HF ResNet: ``embedder.embedder.{convolution,normalization}`` → ``conv1`` / ``bn1``;
    ``encoder.stages.s.layers.b.layer.j.{convolution,normalization}`` → ``layer{s+1}.b.conv{j+1}`` /
    ``bn{j+1}``; ``….shortcut.{convolution,normalization}`` → ``….downsample.{0,1}``.
    """
    if _TV_NAME.match(rest):
        return rest
    if m := _HF_STEM.match(rest):
        kind, param = m.groups()
        return ("conv1." if kind == "convolution" else "bn1.") + param
    if m := _HF_BLOCK.match(rest):
        stage, block, j, kind, param = m.groups()
        base = f"layer{int(stage) + 1}.{block}."
        if j is None:  # the shortcut
            return base + ("downsample.0." if kind == "convolution" else "downsample.1.") + param
        return base + (f"conv{int(j) + 1}." if kind == "convolution" else f"bn{int(j) + 1}.") + param
    return None


_HF_LAYER = {
    # (sub-key regex, encoder name, decoder name)
    r"self_attn_layer_norm\.": ("norm1.", "norm1."),
    r"self_attn\.(out_proj|o_proj)\.": ("self_attn.out_proj.", "self_attn.out_proj."),
    r"encoder_attn\.(out_proj|o_proj)\.": (None, "multihead_attn.out_proj."),
    r"encoder_attn_layer_norm\.": (None, "norm2."),
    r"(mlp\.)?fc1\.": ("linear1.", "linear1."),
    r"(mlp\.)?fc2\.": ("linear2.", "linear2."),
    r"final_layer_norm\.": ("norm2.", "norm3."),
}
_HF_LAYER_RX = [(re.compile("^" + k + r"(weight|bias)$"), v) for k, v in _HF_LAYER.items()]
_HF_QKV = re.compile(r"^(self_attn|encoder_attn)\.([qkv])_proj\.(weight|bias)$")

# A ConditionalDetrForObjectDetection decoder layer: transformers v4 kept the official names of the
# projections on the layer (``sa_qcontent_proj`` …), v5 moved them into the attention modules
# (``self_attn.q_content_proj``, ``encoder_attn.q_pos_sine_proj`` …). kacli's names are the official ones.
_HF_COND_PROJ = {"q_content": "qcontent", "q_pos": "qpos", "k_content": "kcontent", "k_pos": "kpos", "v": "v",
                 "q_pos_sine": "qpos_sine"}  # fmt: skip
_HF_COND_LAYER_RX = [
    (re.compile(r"^((?:sa|ca)_\w+_proj)\.(weight|bias)$"), lambda m: f"{m[1]}.{m[2]}"),
    (re.compile(r"^(self_attn|encoder_attn)\.(q_content|q_pos|k_content|k_pos|v|q_pos_sine)_proj\.(weight|bias)$"),
     lambda m: f"{'sa' if m[1] == 'self_attn' else 'ca'}_{_HF_COND_PROJ[m[2]]}_proj.{m[3]}"),
    (re.compile(r"^(self_attn|encoder_attn)\.(?:out_proj|o_proj)\.(weight|bias)$"),
     lambda m: f"{'self_attn' if m[1] == 'self_attn' else 'cross_attn'}.out_proj.{m[2]}"),
    (re.compile(r"^self_attn_layer_norm\.(weight|bias)$"), lambda m: f"norm1.{m[1]}"),
    (re.compile(r"^encoder_attn_layer_norm\.(weight|bias)$"), lambda m: f"norm2.{m[1]}"),
    (re.compile(r"^final_layer_norm\.(weight|bias)$"), lambda m: f"norm3.{m[1]}"),
    (re.compile(r"^(?:mlp\.)?fc([12])\.(weight|bias)$"), lambda m: f"linear{m[1]}.{m[2]}"),
]  # fmt: skip


def _hf_conditional_decoder_name(sub: str) -> str | None:
    """A ConditionalDetr decoder layer's parameter (v4 or v5 name, after ``decoder.layers.i.``) →
    kacli's (= the official) name after ``transformer.decoder.layers.i.``; None if unknown."""
    for rx, name in _HF_COND_LAYER_RX:
        if m := rx.match(sub):
            return name(m)
    return None


def _convert_hf(sd: dict[str, torch.Tensor], conditional: bool = False) -> tuple[dict[str, torch.Tensor], list[str]]:
    sd = _strip_wrapper(sd, ("model.", "class_labels_classifier."))
    pre = "model." if any(k.startswith("model.") for k in sd) else ""
    if any(re.match(rf"^{re.escape(pre)}(backbone\.)?position_embedding\.", k) for k in sd):
        raise KacliError("learned position embeddings are not supported (kacli uses DETR's sine encoding)")
    out: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    layer_rx = re.compile(rf"^{re.escape(pre)}(encoder|decoder)\.layers\.(\d+)\.(.+)$")
    for k, v in sd.items():
        new = None
        if k.endswith("num_batches_tracked"):
            pass
        elif k.startswith((f"{pre}backbone.conv_encoder.model.", f"{pre}backbone.model.")):
            v4 = k.startswith(f"{pre}backbone.conv_encoder.")
            rest = k[len(f"{pre}backbone.conv_encoder.model."):] if v4 else k[len(f"{pre}backbone.model."):]
            name = _hf_backbone_name(rest)
            new = None if name is None else "backbone.body." + name
        elif k.startswith(f"{pre}input_projection."):
            new = "input_proj." + k[len(f"{pre}input_projection."):]
        elif k == f"{pre}query_position_embeddings.weight":
            new = "query_embed.weight"
        elif k.startswith(f"{pre}decoder.layernorm."):
            new = "transformer.decoder.norm." + k[len(f"{pre}decoder.layernorm."):]
        elif conditional and k.startswith((f"{pre}decoder.query_scale.", f"{pre}decoder.ref_point_head.")):
            new = "transformer." + k[len(pre):]
        elif k.startswith("class_labels_classifier."):
            new = "class_embed." + k[len("class_labels_classifier."):]
        elif k.startswith("bbox_predictor.layers."):
            new = "bbox_embed.layers." + k[len("bbox_predictor.layers."):]
        elif m := layer_rx.match(k):
            part, i, sub = m.groups()
            base = f"transformer.{part}.layers.{i}."
            if conditional and part == "decoder":
                name = _hf_conditional_decoder_name(sub)
                new = None if name is None else base + name
            elif q := _HF_QKV.match(sub):
                attn, which, kind = q.groups()
                if part == "decoder" or attn == "self_attn":
                    ours = "self_attn" if attn == "self_attn" else "multihead_attn"
                    qkv.setdefault((f"{base}{ours}.in_proj_{kind}", k.rsplit(".", 2)[0]), {})[which] = v
                    continue
            else:
                for rx, (enc, dec) in _HF_LAYER_RX:
                    if mm := rx.match(sub):
                        target = enc if part == "encoder" else dec
                        if target is not None:
                            new = base + target + mm.groups()[-1]
                        break
        if new is None:
            ignored.append(k)
        else:
            out[new] = v
    for (target, source), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise KacliError(f"attention {source} lacks {', '.join(sorted({'q', 'k', 'v'} - set(parts)))}_proj")
        out[target] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out, ignored


_PARAM = r"\.(weight|bias)$"
# The transformer tensors each architecture has, in kacli's names (after "transformer.").
_ENCODER_KEYS = re.compile(
    r"^encoder\.(norm" + _PARAM + r"|layers\.\d+\.(self_attn\.(in_proj_(weight|bias)$|out_proj" + _PARAM
    + r")|(linear[12]|norm[12])" + _PARAM + "))"
)
_DECODER_KEYS = {
    "detr": re.compile(
        r"^decoder\.(norm" + _PARAM + r"|layers\.\d+\.((self_attn|multihead_attn)\.(in_proj_(weight|bias)$|out_proj"
        + _PARAM + r")|(linear[12]|norm[123])" + _PARAM + "))"
    ),
    "conditional": re.compile(
        r"^decoder\.((norm|(query_scale|ref_point_head)\.layers\.\d+)" + _PARAM + r"|layers\.\d+\.("
        r"(sa_(qcontent|qpos|kcontent|kpos|v)|ca_(qcontent|qpos|kcontent|kpos|v|qpos_sine))_proj" + _PARAM
        + r"|(self_attn|cross_attn)\.out_proj" + _PARAM + r"|(linear[12]|norm[123])" + _PARAM + "))"
    ),
}


def _check_transformer_keys(state: Mapping[str, torch.Tensor], ignored: list[str], arch: str) -> None:
    """Every encoder and decoder tensor must be one ``arch`` has: a state dict whose transformer is
    another model's (Deformable DETR's sampling offsets, DAB-DETR's anchors …) is refused here, in one
    line naming a tensor, rather than imported in part."""
    name = "Conditional DETR" if arch == "conditional" else "DETR"
    for k in state:
        if not k.startswith("transformer."):
            continue
        sub = k[len("transformer."):]
        if not (_ENCODER_KEYS.match(sub) or _DECODER_KEYS[arch].match(sub)):
            raise KacliError(f"keys are neither DETR's nor Conditional DETR's: {k} is no tensor of a {name} "
                             "transformer (another architecture?)")  # fmt: skip
    layer = re.compile(r"(^|\.)(transformer\.)?(encoder|decoder)\.(layers\.\d+\.|ref_point_head\.|query_scale\.)")
    unknown = [k for k in ignored if layer.search(k) and not k.endswith("num_batches_tracked")]
    if unknown:
        raise KacliError(f"keys are neither DETR's nor Conditional DETR's: {unknown[0]} is no tensor of a {name} "
                         "transformer (another architecture?)")  # fmt: skip


def convert_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Rename a foreign DETR or Conditional DETR state dict to kacli's names.

    Returns ``{"layout", "arch" (detr | conditional), "state" (kacli names → tensors), "ignored"
    (source keys not used)}``. Raises KacliError for a state dict that is neither DETR's nor
    Conditional DETR's (also one whose transformer holds tensors of another architecture).
    """
    sd = dict(sd)
    layout = detect_layout(sd)
    arch = "conditional" if layout in CONDITIONAL_LAYOUTS else "detr"
    if layout in (LAYOUT_DETR, LAYOUT_COND):
        state, ignored = _convert_detr(sd)
    else:
        state, ignored = _convert_hf(sd, conditional=arch == "conditional")
    if not state:
        raise KacliError("no DETR tensors found in the state dict")
    _check_transformer_keys(state, ignored, arch)
    return {"layout": layout, "arch": arch, "state": state, "ignored": sorted(ignored)}


# ---------------------------------------------------------------------------------- architecture


def _count(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    rx = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in state if (m := rx.match(k))}
    return max(found) + 1 if found else 0


def _require(state: Mapping[str, torch.Tensor], *keys: str) -> None:
    missing = [k for k in keys if k not in state]
    if missing:
        raise KacliError(f"not a complete DETR checkpoint: no {', '.join(missing[:3])}")


def infer_arch(
    state: Mapping[str, torch.Tensor],
    *,
    args: Mapping[str, Any] | None = None,
    hf_config: Mapping[str, Any] | None = None,
    heads: int | None = None,
    dilation: bool | None = None,
    arch: str = "detr",
) -> ModelConfig:
    """The :class:`ModelConfig` of converted DETR (``arch`` detr) or Conditional DETR (``arch``
    conditional) weights (see the module docstring for what comes from the tensors and what from
    ``args`` / ``hf_config`` / the caller)."""
    args = dict(args or {})
    hf = dict(hf_config or {})
    _require(
        state, "backbone.body.conv1.weight", "input_proj.weight", "query_embed.weight",
        "transformer.encoder.layers.0.linear1.weight", "transformer.decoder.layers.0.linear1.weight",
    )  # fmt: skip
    if arch == "conditional":
        _require(
            state, "transformer.decoder.ref_point_head.layers.0.weight", "transformer.decoder.query_scale.layers.0.weight",
            "transformer.decoder.layers.0.ca_qpos_proj.weight",
        )  # fmt: skip
    bottleneck = "backbone.body.layer1.0.conv3.weight" in state
    blocks = _count(state, "backbone.body.layer3.")
    depth = {(False, 2): "resnet18", (False, 6): "resnet34", (True, 6): "resnet50", (True, 23): "resnet101"}
    backbone = depth.get((bottleneck, blocks))
    if backbone is None:
        kind = "bottleneck" if bottleneck else "basic"
        raise KacliError(f"unsupported backbone: a ResNet with {blocks} {kind} blocks in layer3")

    def pick(explicit, *candidates, default):
        if explicit is not None:
            return explicit
        for c in candidates:
            if c is not None:
                return c
        return default

    nheads = int(pick(heads, args.get("nheads"), hf.get("encoder_attention_heads"), default=8))
    dec_heads = hf.get("decoder_attention_heads")
    if heads is None and dec_heads is not None and int(dec_heads) != nheads:
        raise KacliError(f"config.json has {nheads} encoder and {dec_heads} decoder attention heads; "
                         "kacli's encoder and decoder share one head count")  # fmt: skip
    dil = bool(pick(dilation, args.get("dilation"), hf.get("dilation"), default=False))
    dropout = float(pick(None, args.get("dropout"), hf.get("dropout"), default=0.1))
    d_model = int(state["input_proj.weight"].shape[0])
    values = dict(
        arch=arch,
        backbone=backbone,
        dilation=dil,
        d_model=d_model,
        nheads=nheads,
        enc_layers=_count(state, "transformer.encoder.layers."),
        dec_layers=_count(state, "transformer.decoder.layers."),
        dim_feedforward=int(state["transformer.encoder.layers.0.linear1.weight"].shape[0]),
        dropout=dropout,
        num_queries=int(state["query_embed.weight"].shape[0]),
        pre_norm="transformer.encoder.norm.weight" in state,
        aux_loss=True,
    )
    return ModelConfig.from_dict(values)


# ---------------------------------------------------------------------------------- label maps


def _pairs_from(data: Any, path: Path) -> list[tuple[int, str]]:
    if isinstance(data, Mapping) and isinstance(data.get("id2label"), Mapping):
        data = data["id2label"]
    if isinstance(data, Mapping):
        items = list(data.items())
    elif isinstance(data, list):
        items = []
        for i, e in enumerate(data):
            if not isinstance(e, Mapping) or "id" not in e or "name" not in e:
                raise KacliError(f"label map entry {i} is not {{id, name}}", path)
            items.append((e["id"], e["name"]))
    else:
        raise KacliError("label map must be a list of {id, name} or a mapping {id: name}", path)
    pairs = []
    for cid, name in items:
        try:
            if isinstance(cid, bool) or (isinstance(cid, float) and not cid.is_integer()):
                raise ValueError
            cid = int(cid)
        except (TypeError, ValueError):
            raise KacliError(f"label map id {cid!r} is not an integer", path) from None
        if cid < 0:
            raise KacliError(f"label map id {cid} is negative", path)
        pairs.append((cid, "" if name is None else str(name)))
    dup = sorted(c for c, n in Counter(c for c, _ in pairs).items() if n > 1)
    if dup:
        raise KacliError(f"label map names id {dup[0]} twice", path)
    return pairs


def resolve_label_map(spec: str | Path | None, num_slots: int, hf_config: Mapping | None = None,
                      sigmoid: bool = False) -> dict:
    """The label map for a checkpoint with ``num_slots`` (= K) classes (``sigmoid``: a head of K
    outputs, Conditional DETR's; else K + 1, the last "no object").

    ``spec``: ``"coco"``, a YAML/JSON file, or None (the HF ``config.json``'s ``id2label`` when
    there is one, else ``coco`` when K is 91). Returns ``{"ids", "names", "source"}`` with the named
    slots in id order; every id must be < K.
    """
    where: str | Path | None = None
    if spec is None:
        if hf_config and isinstance(hf_config.get("id2label"), Mapping) and hf_config["id2label"]:
            pairs, source = _pairs_from(hf_config["id2label"], Path("config.json")), "config.json id2label"
        elif num_slots == len(COCO_NAMES):
            pairs, source = list(enumerate(COCO_NAMES)), "coco"
        else:
            raise KacliError(
                f"the checkpoint has {num_slots} classes, not COCO's {len(COCO_NAMES)}: name them with --label-map FILE"
            )
    elif str(spec) == "coco":
        pairs, source = list(enumerate(COCO_NAMES)), "coco"
    else:
        where = Path(spec)
        data = load_json(where) if where.suffix.lower() == ".json" else load_yaml(where)
        pairs, source = _pairs_from(data, where), str(where)
    named = sorted((c, n) for c, n in pairs if n.strip() and n.strip() != UNNAMED)
    if not named:
        raise KacliError("label map names no category", where)
    too_big = [c for c, _ in named if c >= num_slots]
    if too_big:
        raise KacliError(
            f"label map id {too_big[0]} does not fit the checkpoint's {num_slots} classes "
            f"(class head of {num_slots + (0 if sigmoid else 1)} outputs; DETR's class index is the category id)",
            where,
        )
    return {"ids": [c for c, _ in named], "names": [n for _, n in named], "source": source}


# ---------------------------------------------------------------------------------- public API


def _load_into(model: nn.Module, state: Mapping[str, torch.Tensor], where) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or extra or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {', '.join(missing[:3])}")
        if extra:
            parts.append(f"unexpected {len(extra)}: {', '.join(extra[:3])}")
        if wrong:
            parts.append(f"wrong shape {len(wrong)}: {'; '.join(wrong[:2])}")
        raise KacliError("weights do not fit the inferred DETR architecture (" + "; ".join(parts) + ")", where)
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)


def import_checkpoint(
    src: str | Path,
    dst: str | Path,
    label_map_spec: str | Path | None = None,
    *,
    heads: int | None = None,
    dilation: bool | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Convert a facebookresearch/detr, UP-DETR, Atten4Vis/ConditionalDETR or HF transformers
    (``DetrForObjectDetection``, ``ConditionalDetrForObjectDetection``) checkpoint into a kacli
    checkpoint (kind ``detr``; arch ``conditional`` for Conditional DETR) at ``dst``, written atomically.

    Returns a report: ``source``, ``out``, ``layout``, ``arch`` (dict), ``label_map`` (ids, names,
    source), ``dropped_slots`` (class indices without a name: never predicted; a softmax head keeps
    them in its normalisation after "no object", a sigmoid head loses their rows), ``loaded``
    (kacli keys written), ``ignored`` (source keys not used, e.g. UP-DETR's ``patch2query.*``),
    ``notes`` (lines worth reading, e.g. a transformers setting kacli does not follow).

    Raises KacliError (nothing written) for a file that is no checkpoint, needs code to unpickle,
    is neither DETR's nor Conditional DETR's, or whose label map does not fit.
    """

    check_output_file(dst, force)  # an existing dst is replaced only with ``force``
    obj, meta = read_source(src)
    path = meta["path"]
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        raise KacliError("already a kacli checkpoint; nothing to import", path)
    sd, args = extract_state_dict(obj, path)
    try:
        conv = convert_state_dict(sd)
        state = conv["state"]
        _require(state, "class_embed.weight", "class_embed.bias", "bbox_embed.layers.2.weight")
        hf_config = _hf_config_for(conv["layout"], meta["hf_config"])
        cfg = infer_arch(state, args=args, hf_config=hf_config, heads=heads, dilation=dilation, arch=conv["arch"])
    except KacliError as e:
        raise KacliError(e.message, e.path or path) from None
    sigmoid = cfg.classifier == "sigmoid"
    num_slots = int(state["class_embed.weight"].shape[0]) - (0 if sigmoid else 1)
    if num_slots < 1:
        raise KacliError("class head has no class besides 'no object'", path)
    lm = resolve_label_map(label_map_spec, num_slots, hf_config, sigmoid=sigmoid)
    dropped = [k for k in range(num_slots) if k not in set(lm["ids"])]
    if sigmoid:
        # Each class is its own sigmoid: an unnamed slot's row is simply removed (no normalisation
        # to keep), so every named class keeps its score and no unnamed slot is ever predicted.
        keep = lm["ids"]
    else:
        keep = lm["ids"] + [num_slots] + dropped  # the named slots, "no object", the unnamed slots
    state = dict(state)
    state["class_embed.weight"] = state["class_embed.weight"][keep]
    state["class_embed.bias"] = state["class_embed.bias"][keep]
    if not sigmoid:
        cfg.unnamed_classes = len(dropped)
    notes = []
    if conv["arch"] == "conditional" and hf_config and hf_config.get("auxiliary_loss"):
        notes.append(
            "config.json has auxiliary_loss: true, with which transformers feeds each decoder layer the "
            "previous layer's normalised output; kacli computes the official Conditional DETR's decoder "
            "(as transformers does with auxiliary_loss: false), so its outputs may differ from transformers'"
        )

    model = DETR(cfg, len(lm["ids"]))
    _load_into(model, state, path)
    label_map = {"ids": lm["ids"], "names": lm["names"]}
    save_checkpoint(
        dst,
        {
            "kind": "detr",
            "arch": cfg.to_dict(),
            "label_map": label_map,
            "task": None,
            "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "config": {},
            "inputs": {Path(path).name: sha256_file(path)},
            "meta": {
                "imported_from": str(path),
                "layout": conv["layout"],
                "classifier": cfg.classifier,
                "label_map_source": lm["source"],
                "dropped_slots": dropped,
                "ignored_keys": conv["ignored"],
            },
        },
        force=force,
    )
    return {
        "source": str(path),
        "out": str(dst),
        "layout": conv["layout"],
        "arch": cfg.to_dict(),
        "label_map": {**label_map, "source": lm["source"]},
        "dropped_slots": dropped,
        "loaded": sorted(state),
        "ignored": conv["ignored"],
        "notes": notes,
    }


def init_from_checkpoint(model: nn.Module, path_or_ckpt: str | Path | Mapping, num_classes: int) -> dict[str, Any]:
    """Initialise ``model`` (a DETR or student for ``num_classes`` classes) from a kacli checkpoint
    or a foreign DETR or Conditional DETR checkpoint (path, or an already loaded dict), for
    ``train-teacher --init``.

    Every tensor whose (converted) name and shape match is loaded. The class head (``class_embed``)
    is loaded when its classifier kind (softmax, sigmoid) is the model's and its class count equals
    ``num_classes``, and re-initialised otherwise (a sigmoid head at the focal prior 0.01; an imported
    checkpoint's unnamed slots are not part of that count: the head keeps its named classes and
    "no object").

    Returns ``{"source", "layout", "loaded": [keys], "skipped": [{"key", "reason"}],
    "missing": [model keys the checkpoint lacks], "ignored": [source keys not DETR's],
    "class_head": "loaded" | "reinitialised" | "absent"}``.

    Raises KacliError (model untouched) for an unreadable or non-DETR file, or when fewer than half
    of the model's tensors find a match (another architecture).
    """
    if isinstance(path_or_ckpt, Mapping):
        obj, where = path_or_ckpt, path_or_ckpt.get("path")
    else:
        obj, meta = read_source(path_or_ckpt)
        where = meta["path"]
    ignored: list[str] = []
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        if not isinstance(obj.get("model"), Mapping):
            raise KacliError("checkpoint lacks 'model'", where)
        state, layout = dict(obj["model"]), LAYOUT_KACLI
        arch = obj.get("arch") or {}
        src_arch = arch.get("arch", "detr") if isinstance(arch, Mapping) else "detr"
        unnamed = (arch.get("unnamed_classes") if isinstance(arch, Mapping) else 0) or 0
        if unnamed and "class_embed.weight" in state:  # an imported head: its named classes and "no object"
            for k in ("class_embed.weight", "class_embed.bias"):
                state[k] = state[k][: state[k].shape[0] - int(unnamed)]
    else:
        sd, _ = extract_state_dict(obj, where)
        try:
            conv = convert_state_dict(sd)
        except KacliError as e:
            raise KacliError(e.message, e.path or where) from None
        state, layout, ignored, src_arch = conv["state"], conv["layout"], conv["ignored"], conv["arch"]

    own = model.state_dict()
    sigmoid = getattr(model, "classifier", "softmax") == "sigmoid"
    src_sigmoid = src_arch == "conditional"
    src_head = state.get("class_embed.weight")
    # A head is kept only for the same classifier kind and class count (sigmoid: K rows; softmax: K + 1).
    same_classes = (
        src_head is not None
        and src_sigmoid == sigmoid
        and src_head.shape[0] == num_classes + (0 if sigmoid else 1)
        and "class_embed.weight" in own
        and src_head.shape == own["class_embed.weight"].shape
    )
    load: dict[str, torch.Tensor] = {}
    skipped: list[dict[str, str]] = []
    for k, v in state.items():
        if k not in own:
            skipped.append({"key": k, "reason": "not in the model"})
        elif k.startswith("class_embed.") and not same_classes:
            have = "no" if src_head is None else src_head.shape[0] - (0 if src_sigmoid else 1)
            kinds = "" if src_sigmoid == sigmoid else (
                f" ({'sigmoid' if src_sigmoid else 'softmax'} head, the model's is {'sigmoid' if sigmoid else 'softmax'})")
            skipped.append({"key": k, "reason": f"{have} classes, the model has {num_classes}{kinds}"})
        elif v.shape != own[k].shape:
            skipped.append({"key": k, "reason": f"shape {tuple(v.shape)} vs the model's {tuple(own[k].shape)}"})
        else:
            load[k] = v
    if len(load) < len(own) / 2:
        example = next((f"; e.g. {s['key']}: {s['reason']}" for s in skipped if "shape" in s["reason"]), "")
        raise KacliError(
            f"the checkpoint does not fit the model: only {len(load)} of its {len(own)} tensors match "
            f"(another architecture?){example}",
            where,
        )
    head = "loaded" if same_classes else ("absent" if src_head is None else "reinitialised")
    if head == "reinitialised" and isinstance(getattr(model, "class_embed", None), nn.Linear):
        model.class_embed.reset_parameters()
        if sigmoid:  # every class back at the focal prior 0.01, as a new sigmoid head starts
            nn.init.constant_(model.class_embed.bias, -math.log((1 - 0.01) / 0.01))
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in load.items()}, strict=False)
    return {
        "source": None if where is None else str(where),
        "layout": layout,
        "loaded": sorted(load),
        "skipped": skipped,
        "missing": sorted(k for k in own if k not in load),
        "ignored": ignored,
        "class_head": head,
    }
