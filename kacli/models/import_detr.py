"""Foreign DETR checkpoints → kacli: facebookresearch/detr, UP-DETR and HF transformers.

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

Architecture inferred from the tensors: ResNet depth from the block counts (layer3: 2/6 basic
blocks → resnet18/34, 6/23 bottlenecks → resnet50/101), d_model, encoder/decoder layers, FFN
width, queries, pre-norm. Not visible in the weights and taken from ``args`` / ``config.json``
when present, else from the caller (``--heads``, ``--dilation``), else DETR's defaults: 8 heads,
no dilation (DC5 checkpoints need ``--dilation`` unless their ``args`` say so).

Label maps follow DETR's convention: class index k of the checkpoint *is* category id k. The map
(``coco``, or a YAML/JSON file: a list of ``{id, name}``, a mapping ``{id: name}``, or an HF
``config.json`` with ``id2label``) names the slots to keep; every id must be a class slot of the
checkpoint (``id < K``, the head having K+1 outputs). Slots without a name (or named ``N/A``) are
dropped from the class head — for COCO the 11 unused ids of DETR's 91 — so the kacli label map
holds real categories only. The unnamed slots' outputs stay in the head, after "no object"
(``ModelConfig.unnamed_classes``): they count in the softmax's normalisation, folded into "no
object", so every score (and AP) equals DETR's own post-processing (softmax over all K+1
logits, "no object" dropped, max), and no unnamed slot is ever predicted. (A query whose best
slot is unnamed, which DETR reports under an id no dataset has, is reported here as its best named
class at that class's probability.) Boxes are unchanged.
"""

from __future__ import annotations

import argparse
import json
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
LAYOUT_KACLI = "kacli"


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
    cfg = (p if p.is_dir() else p.parent) / "config.json"
    if not cfg.is_file():
        return None
    data = load_json(cfg)
    return data if isinstance(data, dict) and data.get("model_type") in (None, "detr") else None


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


def detect_layout(sd: Mapping[str, torch.Tensor]) -> str:
    """``facebookresearch/detr`` (also kacli's own names), ``hf-transformers``, or a KacliError."""
    keys = list(sd)

    def has(pattern: str) -> bool:
        rx = re.compile(pattern)
        return any(rx.search(k) for k in keys)

    if has(r"(^|\.)transformer\.(encoder|decoder)\.layers\.\d+\.") or has(r"(^|\.)backbone\.0\.body\."):
        return LAYOUT_DETR
    if has(r"(^|\.)(encoder|decoder)\.layers\.\d+\.(self_attn|encoder_attn)\.[qkv]_proj\.") or has(
        r"(^|\.)(class_labels_classifier|input_projection|query_position_embeddings)\."
    ):
        return LAYOUT_HF
    raise KacliError(
        "not a DETR state dict (no facebookresearch/detr or HF transformers DETR keys; "
        f"it has e.g. {', '.join(sorted(keys)[:3])})"
    )


def _strip_wrapper(sd: dict[str, torch.Tensor], core: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Remove a ``detr.`` prefix (segmentation wrappers) when the core keys sit under it."""
    if not any(k.startswith(core) for k in sd) and any(k.startswith("detr.") for k in sd):
        return {(k[len("detr."):] if k.startswith("detr.") else k): v for k, v in sd.items()}
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


def _convert_hf(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
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
        elif k.startswith("class_labels_classifier."):
            new = "class_embed." + k[len("class_labels_classifier."):]
        elif k.startswith("bbox_predictor.layers."):
            new = "bbox_embed.layers." + k[len("bbox_predictor.layers."):]
        elif m := layer_rx.match(k):
            part, i, sub = m.groups()
            base = f"transformer.{part}.layers.{i}."
            if q := _HF_QKV.match(sub):
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


def convert_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Rename a foreign DETR state dict to kacli's names.

    Returns ``{"layout", "state" (kacli names → tensors), "ignored" (source keys not used)}``.
    Raises KacliError for a state dict that is not DETR-like.
    """
    sd = dict(sd)
    layout = detect_layout(sd)
    state, ignored = (_convert_detr if layout == LAYOUT_DETR else _convert_hf)(sd)
    if not state:
        raise KacliError("no DETR tensors found in the state dict")
    return {"layout": layout, "state": state, "ignored": sorted(ignored)}


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
) -> ModelConfig:
    """The :class:`ModelConfig` of converted DETR weights (see the module docstring for what comes
    from the tensors and what from ``args`` / ``hf_config`` / the caller)."""
    args = dict(args or {})
    hf = dict(hf_config or {})
    _require(
        state, "backbone.body.conv1.weight", "input_proj.weight", "query_embed.weight",
        "transformer.encoder.layers.0.linear1.weight", "transformer.decoder.layers.0.linear1.weight",
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
    dil = bool(pick(dilation, args.get("dilation"), hf.get("dilation"), default=False))
    dropout = float(pick(None, args.get("dropout"), hf.get("dropout"), default=0.1))
    d_model = int(state["input_proj.weight"].shape[0])
    values = dict(
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


def resolve_label_map(spec: str | Path | None, num_slots: int, hf_config: Mapping | None = None) -> dict:
    """The label map for a checkpoint with ``num_slots`` (= K) classes.

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
            f"(class head of {num_slots + 1} outputs; DETR's class index is the category id)",
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
    """Convert a facebookresearch/detr, UP-DETR or HF transformers DETR checkpoint into a kacli
    checkpoint (kind ``detr``) at ``dst``, written atomically.

    Returns a report: ``source``, ``out``, ``layout``, ``arch`` (dict), ``label_map`` (ids, names,
    source), ``dropped_slots`` (class indices without a name: never predicted, kept in the
    softmax's normalisation after "no object"), ``loaded``
    (kacli keys written), ``ignored`` (source keys not used, e.g. UP-DETR's ``patch2query.*``).

    Raises KacliError (nothing written) for a file that is no checkpoint, needs code to unpickle,
    is not DETR-like, or whose label map does not fit.
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
        hf_config = meta["hf_config"] if conv["layout"] == LAYOUT_HF else None
        cfg = infer_arch(state, args=args, hf_config=hf_config, heads=heads, dilation=dilation)
    except KacliError as e:
        raise KacliError(e.message, e.path or path) from None
    num_slots = int(state["class_embed.weight"].shape[0]) - 1
    if num_slots < 1:
        raise KacliError("class head has no class besides 'no object'", path)
    lm = resolve_label_map(label_map_spec, num_slots, hf_config)
    dropped = [k for k in range(num_slots) if k not in set(lm["ids"])]
    keep = lm["ids"] + [num_slots] + dropped  # the named slots, "no object", the unnamed slots
    state = dict(state)
    state["class_embed.weight"] = state["class_embed.weight"][keep]
    state["class_embed.bias"] = state["class_embed.bias"][keep]
    cfg.unnamed_classes = len(dropped)

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
    }


def init_from_checkpoint(model: nn.Module, path_or_ckpt: str | Path | Mapping, num_classes: int) -> dict[str, Any]:
    """Initialise ``model`` (a DETR or student for ``num_classes`` classes) from a kacli checkpoint
    or a foreign DETR checkpoint (path, or an already loaded dict), for ``train-teacher --init``.

    Every tensor whose (converted) name and shape match is loaded. The class head (``class_embed``)
    is loaded when its class count equals ``num_classes`` and re-initialised otherwise (an imported
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
        unnamed = (obj.get("arch") or {}).get("unnamed_classes") or 0
        if unnamed and "class_embed.weight" in state:  # an imported head: its named classes and "no object"
            for k in ("class_embed.weight", "class_embed.bias"):
                state[k] = state[k][: state[k].shape[0] - int(unnamed)]
    else:
        sd, _ = extract_state_dict(obj, where)
        try:
            conv = convert_state_dict(sd)
        except KacliError as e:
            raise KacliError(e.message, e.path or where) from None
        state, layout, ignored = conv["state"], conv["layout"], conv["ignored"]

    own = model.state_dict()
    src_head = state.get("class_embed.weight")
    same_classes = (
        src_head is not None
        and src_head.shape[0] == num_classes + 1
        and "class_embed.weight" in own
        and src_head.shape == own["class_embed.weight"].shape
    )
    load: dict[str, torch.Tensor] = {}
    skipped: list[dict[str, str]] = []
    for k, v in state.items():
        if k not in own:
            skipped.append({"key": k, "reason": "not in the model"})
        elif k.startswith("class_embed.") and not same_classes:
            have = "no" if src_head is None else src_head.shape[0] - 1
            skipped.append({"key": k, "reason": f"{have} classes, the model has {num_classes}"})
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
