"""Conditional DETR checkpoints → kacli: a transformers ConditionalDetrForObjectDetection (its own forward
and post_process_object_detection are the oracle), the official Atten4Vis/ConditionalDETR .pth layout,
and state dicts that are neither DETR's nor Conditional DETR's."""

from __future__ import annotations

import argparse
import json
import math
import re

import pytest
import torch
import yaml

from kacli.eval.infer import detect_batch
from kacli.models import DETR
from kacli.models.checkpoint import build_model, load_checkpoint
from kacli.models.import_detr import import_checkpoint, init_from_checkpoint
from kacli.models.postprocess import postprocess
from conftest import assert_one_line_error
from test_import import COCO_UNUSED, outputs, random_detr, small_cfg, to_detr_layout

ID2LABEL = {0: "N/A", 1: "cat", 2: "dog", 3: "N/A", 4: "bird", 5: "fish", 6: "cow"}
NAMED = [1, 2, 4, 5, 6]
SIZES = torch.tensor([[480, 640], [333, 500]])  # the original images' sizes the boxes are scaled to


def images():
    """Two images; the second padded at the bottom and right by multiples of the stride (32), where
    transformers' nearest-interpolated mask and kacli's token grid (docs/ARCHITECTURE.md) agree."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 128, 192, generator=g)
    mask = torch.zeros(2, 128, 192, dtype=torch.bool)
    mask[1, 96:, :] = True
    mask[1, :, 128:] = True
    x[1][:, mask[1]] = 0
    return x, mask


# -- transformers' model, the oracle ---------------------------------------------------------------


@pytest.fixture(scope="module")
def hf():
    """A small random ConditionalDetrForObjectDetection (ResNet-18 from a config: nothing downloads),
    20 queries × 7 classes (ids 0 and 3 unnamed), post-norm as the official model, and its
    detections on :func:`images` by transformers' own post-processing."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    backbone = transformers.ResNetConfig(layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512],
                                         embedding_size=64, out_features=["stage4"])  # fmt: skip
    cfg = transformers.ConditionalDetrConfig(
        backbone_config=backbone, d_model=64, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_layers=2, decoder_layers=3, encoder_ffn_dim=96, decoder_ffn_dim=96, num_queries=20, dropout=0.0,
        num_labels=7, id2label=ID2LABEL,
    )  # fmt: skip
    model = transformers.ConditionalDetrForObjectDetection(cfg).eval()
    # Every tensor random and large enough that queries differ: reference points spread over the
    # image, sharp cross-attention, a class head that separates classes. A wrong name, a swapped
    # axis or a misplaced norm then moves scores by far more than the tolerance.
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand_like(t) + 0.5)
            elif name.endswith("running_mean"):
                t.copy_(0.1 * torch.randn_like(t))
            elif t.dim() == 1 and "norm" in name and name.endswith("weight"):
                t.copy_(1 + 0.2 * torch.randn_like(t))
            elif t.dim() == 1:
                t.copy_(0.1 * torch.randn_like(t))
            elif "query_position_embeddings" in name:
                t.copy_(torch.randn_like(t))
            else:
                gain = 3.0 if ("classifier" in name or "_attn.q" in name or "_attn.k" in name) else 1.0
                t.copy_(gain * torch.randn_like(t) / t[0].numel() ** 0.5)
    x, mask = images()
    with torch.no_grad():
        out = model(pixel_values=x, pixel_mask=(~mask).long())
    processor = transformers.ConditionalDetrImageProcessor()
    detections = processor.post_process_object_detection(out, threshold=0.0, target_sizes=SIZES, top_k=100)
    return {"model": model, "outputs": out, "detections": detections}


def kacli_detections(ckpt_path):
    ckpt = load_checkpoint(ckpt_path)
    model = build_model(ckpt).eval()
    x, mask = images()
    with torch.no_grad():
        return ckpt, detect_batch(model, x, mask, SIZES)


def assert_transformers_detections(ckpt_path, hf):
    """kacli's detections (eval's path: model → top-100 sigmoid post-processing) are transformers':
    among transformers' top 100 (query, class) pairs, those of named classes come first in kacli's,
    in the same order, with the same category id, score (≤ 1e-4) and pixel box (≤ 0.01 px); kacli
    fills the rest of its 100 with the next named pairs. Returns the largest differences."""
    ckpt, ours = kacli_detections(ckpt_path)
    ids = torch.tensor(ckpt["label_map"]["ids"])
    assert ids.tolist() == NAMED
    worst = {"score": 0.0, "box_px": 0.0}
    for ref, got in zip(hf["detections"], ours):
        named = torch.isin(ref["labels"], ids)
        n = int(named.sum())
        assert len(ref["scores"]) == 100 and 50 < n < 100  # unnamed ids do reach transformers' top 100
        assert len(got["scores"]) == 100
        assert torch.equal(ids[got["labels"][:n]], ref["labels"][named])
        worst["score"] = max(worst["score"], float((got["scores"][:n] - ref["scores"][named]).abs().max()))
        worst["box_px"] = max(worst["box_px"], float((got["boxes"][:n] - ref["boxes"][named]).abs().max()))
        assert (got["scores"][n:] <= ref["scores"][-1]).all()  # the next named pairs, below transformers' last
        assert got["scores"][:n].std() > 0.05 and got["boxes"][:n, 0].std() > 20  # detections that differ
    assert worst["score"] <= 1e-4 and worst["box_px"] <= 0.01, worst
    return worst


def test_transformers_folder_gives_transformers_detections(tmp_path, cli, hf):
    folder = tmp_path / "conditional-detr"
    hf["model"].save_pretrained(folder)
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()

    res = cli("import-checkpoint", folder, "--out", tmp_path / "c.pt")  # label map from config.json's id2label
    assert res.exit_code == 0, res.stderr
    assert "Conditional DETR" in res.stdout and "hf-transformers-conditional" in res.stdout
    assert "note:" not in res.stdout
    ckpt = load_checkpoint(tmp_path / "c.pt")
    a = ckpt["arch"]
    assert (a["arch"], a["backbone"], a["d_model"], a["nheads"], a["enc_layers"], a["dec_layers"]) == (
        "conditional", "resnet18", 64, 4, 2, 3)
    assert (a["dim_feedforward"], a["num_queries"], a["pre_norm"], a.get("unnamed_classes", 0)) == (96, 20, False, 0)
    assert ckpt["label_map"]["names"] == ["cat", "dog", "bird", "fish", "cow"]
    assert ckpt["meta"]["dropped_slots"] == [0, 3] and ckpt["meta"]["classifier"] == "sigmoid"
    assert ckpt["model"]["class_embed.weight"].shape[0] == 5  # the unnamed slots' rows are gone

    # The raw outputs first: named logits and every box are transformers'.
    model = build_model(ckpt).eval()
    x, mask = images()
    with torch.no_grad():
        ours = model(x, mask)
    torch.testing.assert_close(ours["pred_logits"], hf["outputs"].logits[..., NAMED], atol=1e-5, rtol=0)
    torch.testing.assert_close(ours["pred_boxes"], hf["outputs"].pred_boxes, atol=1e-6, rtol=0)
    assert_transformers_detections(tmp_path / "c.pt", hf)


#: transformers v5's projection names in a decoder layer's attention → the official (and v4) ones.
OFFICIAL_PROJ = {"q_content": "qcontent", "q_pos": "qpos", "k_content": "kcontent", "k_pos": "kpos", "v": "v",
                 "q_pos_sine": "qpos_sine"}  # fmt: skip


def hf_v5_to_v4(name: str) -> str:
    """transformers v5 ConditionalDetr names → v4's (the inverse of transformers' own v4 → v5 renames)."""
    name = name.replace("model.backbone.model.", "model.backbone.conv_encoder.model.")
    name = re.sub(r"layers\.(\d+)\.mlp\.fc([12])", r"layers.\1.fc\2", name)
    name = name.replace("self_attn.o_proj", "self_attn.out_proj").replace("encoder_attn.o_proj", "encoder_attn.out_proj")
    if m := re.match(r"^(model\.decoder\.layers\.\d+\.)(self_attn|encoder_attn)\.(\w+)_proj\.(.+)$", name):
        if m[3] == "out":
            return name
        prefix, attn, proj, param = m.groups()
        return f"{prefix}{'sa' if attn == 'self_attn' else 'ca'}_{OFFICIAL_PROJ[proj]}_proj.{param}"
    return name


def test_transformers_v4_names_give_the_same_detections(tmp_path, hf):
    folder = tmp_path / "v4"
    folder.mkdir()
    sd = {hf_v5_to_v4(k): v.clone() for k, v in hf["model"].state_dict().items()}
    assert "model.decoder.layers.0.ca_qpos_sine_proj.weight" in sd and "model.decoder.layers.1.sa_v_proj.bias" in sd
    assert "model.decoder.layers.1.ca_qpos_proj.weight" not in sd  # the first layer's only
    torch.save(sd, folder / "pytorch_model.bin")
    config = hf["model"].config.to_dict()
    config["auxiliary_loss"] = True  # transformers would compute another decoder: the report says so
    (folder / "config.json").write_text(json.dumps(config))
    rep = import_checkpoint(folder, tmp_path / "v4.pt")
    assert rep["layout"] == "hf-transformers-conditional" and rep["ignored"] == []
    assert len(rep["notes"]) == 1 and "auxiliary_loss" in rep["notes"][0]
    assert_transformers_detections(tmp_path / "v4.pt", hf)


def tv_resnet_name(hf_name: str) -> str:
    """HF ResNet names → torchvision's (``conv1``, ``layer1.0.bn2``, ``layer2.0.downsample.0`` …)."""
    if m := re.match(r"^embedder\.embedder\.(convolution|normalization)\.(.+)$", hf_name):
        return ("conv1." if m[1] == "convolution" else "bn1.") + m[2]
    m = re.match(r"^encoder\.stages\.(\d)\.layers\.(\d+)\.(?:shortcut|layer\.(\d))\.(convolution|normalization)\.(.+)$", hf_name)
    stage, block, j, kind, param = m.groups()
    base = f"layer{int(stage) + 1}.{block}."
    if j is None:
        return base + ("downsample.0." if kind == "convolution" else "downsample.1.") + param
    return base + ("conv" if kind == "convolution" else "bn") + f"{int(j) + 1}.{param}"


def hf_to_official(sd: dict) -> dict:
    """transformers v5 ConditionalDetrForObjectDetection → Atten4Vis/ConditionalDETR's state dict."""
    out, qkv = {}, {}
    norms = {"encoder": {"self_attn_layer_norm": "norm1", "final_layer_norm": "norm2"},
             "decoder": {"self_attn_layer_norm": "norm1", "encoder_attn_layer_norm": "norm2", "final_layer_norm": "norm3"}}
    for k, v in sd.items():
        v = v.clone()
        if k.endswith("num_batches_tracked"):
            continue
        if k.startswith("model.backbone.model."):
            out["backbone.0.body." + tv_resnet_name(k[len("model.backbone.model."):])] = v
        elif k.startswith("model.input_projection."):
            out["input_proj." + k.rsplit(".", 1)[1]] = v
        elif k == "model.query_position_embeddings.weight":
            out["query_embed.weight"] = v
        elif k.startswith("class_labels_classifier."):
            out["class_embed." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("bbox_predictor."):
            out["bbox_embed." + k[len("bbox_predictor."):]] = v
        elif k.startswith("model.decoder.layernorm."):
            out["transformer.decoder.norm." + k.rsplit(".", 1)[1]] = v
        elif k.startswith(("model.decoder.query_scale.", "model.decoder.ref_point_head.")):
            out["transformer." + k[len("model."):]] = v
        else:
            part, i, sub = re.match(r"^model\.(encoder|decoder)\.layers\.(\d+)\.(.+)$", k).groups()
            base = f"transformer.{part}.layers.{i}."
            module, rest = sub.rsplit(".", 1)
            if part == "encoder" and re.match(r"self_attn\.[qkv]_proj", module):
                qkv.setdefault(base + "self_attn.in_proj_" + rest, {})[module[-6]] = v
            elif module in ("self_attn.o_proj", "encoder_attn.o_proj"):
                out[base + ("self_attn" if module.startswith("self") else "cross_attn") + ".out_proj." + rest] = v
            elif m := re.match(r"^(self_attn|encoder_attn)\.(\w+)_proj$", module):
                out[f"{base}{'sa' if m[1] == 'self_attn' else 'ca'}_{OFFICIAL_PROJ[m[2]]}_proj.{rest}"] = v
            elif module.startswith("mlp.fc"):
                out[base + "linear" + module[-1] + "." + rest] = v
            else:
                out[base + norms[part][module] + "." + rest] = v
    for k, parts in qkv.items():
        out[k] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def test_official_pth_gives_transformers_detections(tmp_path, cli, hf):
    sd = hf_to_official(hf["model"].state_dict())
    assert "transformer.decoder.layers.0.ca_qpos_proj.weight" in sd and "transformer.decoder.layers.2.sa_v_proj.bias" in sd
    torch.save({"model": sd, "args": argparse.Namespace(nheads=4, dilation=False, dropout=0.0)}, tmp_path / "cond.pth")
    (tmp_path / "names.yaml").write_text(yaml.safe_dump({i: n for i, n in ID2LABEL.items()}))
    res = cli("import-checkpoint", tmp_path / "cond.pth", "--out", tmp_path / "cond.pt", "--label-map", tmp_path / "names.yaml")
    assert res.exit_code == 0, res.stderr
    assert "Atten4Vis/ConditionalDETR" in res.stdout and "2 unnamed slots: rows removed" in res.stdout
    worst = assert_transformers_detections(tmp_path / "cond.pt", hf)
    print(f"official .pth vs transformers: scores {worst['score']:.2e}, boxes {worst['box_px']:.2e} px")


# -- without transformers: kacli's own Conditional DETR in the official layout ------------------------


def test_official_coco_pth_keeps_every_named_class(tmp_path):
    """COCO's 91 sigmoid slots: the 11 unnamed rows go, every named class keeps its logit, every box
    stays; the top 100 are the official post-processing's named pairs, then the next named ones."""
    model = random_detr(small_cfg(arch="conditional", num_queries=30), 91, seed=2)
    ref = outputs(model)
    torch.save({"model": to_detr_layout(model.state_dict()), "args": argparse.Namespace(nheads=4)}, tmp_path / "c.pth")
    rep = import_checkpoint(tmp_path / "c.pth", tmp_path / "c.pt")  # 91 slots: coco by default
    assert rep["layout"] == "Atten4Vis/ConditionalDETR" and rep["arch"]["arch"] == "conditional"
    assert rep["dropped_slots"] == COCO_UNUSED and rep["arch"]["num_queries"] == 30 and rep["arch"]["nheads"] == 4
    ck = load_checkpoint(tmp_path / "c.pt")
    ids = ck["label_map"]["ids"]
    assert len(ids) == 80 and ck["model"]["class_embed.weight"].shape == (80, 64)
    got = outputs(build_model(ck))
    for a, b in [(got, ref), *zip(got["aux_outputs"], ref["aux_outputs"])]:
        torch.testing.assert_close(a["pred_logits"], b["pred_logits"][..., ids], atol=1e-5, rtol=0)
        torch.testing.assert_close(a["pred_boxes"], b["pred_boxes"], atol=1e-6, rtol=0)
    sizes = torch.tensor([[480, 640], [333, 500]])
    official = postprocess(ref, sizes, "sigmoid")  # over all 91 slots, as the official PostProcess
    ours = postprocess(got, sizes, "sigmoid")
    for r, g in zip(official, ours):
        named = ~torch.isin(r["labels"], torch.tensor(COCO_UNUSED))
        n = int(named.sum())
        assert torch.equal(torch.tensor(ids)[g["labels"][:n]], r["labels"][named])
        torch.testing.assert_close(g["scores"][:n], r["scores"][named], atol=1e-6, rtol=0)
        torch.testing.assert_close(g["boxes"][:n], r["boxes"][named], atol=1e-3, rtol=0)


def test_pre_norm_conditional_and_init(tmp_path):
    model = random_detr(small_cfg(arch="conditional", pre_norm=True, num_queries=4), 3, seed=4)
    torch.save(to_detr_layout(model.state_dict()), tmp_path / "bare.pth")  # bare state dict, no args: 8 heads
    (tmp_path / "lm.yaml").write_text(yaml.safe_dump([{"id": i, "name": f"c{i}"} for i in range(3)]))
    rep = import_checkpoint(tmp_path / "bare.pth", tmp_path / "p.pt", tmp_path / "lm.yaml", heads=4)
    assert rep["arch"]["pre_norm"] is True and rep["dropped_slots"] == []
    got, ref = outputs(build_model(load_checkpoint(tmp_path / "p.pt"))), outputs(model)
    torch.testing.assert_close(got["pred_logits"], ref["pred_logits"], atol=1e-5, rtol=0)
    torch.testing.assert_close(got["pred_boxes"], ref["pred_boxes"], atol=1e-6, rtol=0)

    # --init: a sigmoid head of the same classes is kept; another class count, or a softmax model,
    # starts a fresh head (a sigmoid one at the focal prior).
    same = DETR(small_cfg(arch="conditional", pre_norm=True, num_queries=4), 3)
    assert init_from_checkpoint(same, tmp_path / "p.pt", 3)["class_head"] == "loaded"
    assert torch.equal(same.class_embed.weight, model.class_embed.weight)
    other = DETR(small_cfg(arch="conditional", pre_norm=True, num_queries=4), 2)
    assert init_from_checkpoint(other, tmp_path / "bare.pth", 2)["class_head"] == "reinitialised"
    torch.testing.assert_close(other.class_embed.bias, torch.full((2,), -math.log(99)))
    softmax = DETR(small_cfg(pre_norm=True, num_queries=4), 2)  # 3 outputs, as the sigmoid head's 3 rows
    rep = init_from_checkpoint(softmax, tmp_path / "p.pt", 2)
    assert rep["class_head"] == "reinitialised" and any("sigmoid head" in s["reason"] for s in rep["skipped"])


# -- neither DETR's nor Conditional DETR's: one line naming the file, exit 2, nothing written ----------


def _official(arch: str) -> dict:
    return to_detr_layout(random_detr(small_cfg(arch=arch, num_queries=3), 3).state_dict())


def _deformable() -> dict:  # Deformable DETR: multi-scale sampling in the encoder and decoder
    sd = _official("detr")
    sd["transformer.level_embed"] = torch.randn(4, 64)
    sd["transformer.encoder.layers.0.self_attn.sampling_offsets.weight"] = torch.randn(256, 64)
    sd["transformer.decoder.layers.0.cross_attn.sampling_offsets.weight"] = torch.randn(256, 64)
    return sd


def _dab() -> dict:  # DAB-DETR: Conditional DETR's decoder with anchor boxes as queries
    sd = _official("conditional")
    sd["refpoint_embed.weight"] = torch.randn(3, 4)
    sd["transformer.decoder.ref_anchor_head.layers.0.weight"] = torch.randn(64, 64)
    return sd


def _mixed() -> dict:  # a DETR decoder carrying one Conditional DETR tensor
    sd = _official("detr")
    sd["transformer.decoder.ref_point_head.layers.0.weight"] = torch.randn(64, 64)
    return sd


def _hf_unknown() -> dict:  # transformers' names, a decoder tensor Conditional DETR has not
    sd = {f"model.decoder.layers.0.encoder_attn.{p}.weight": torch.randn(64, 64)
          for p in ("q_content_proj", "k_content_proj", "v_proj", "q_pos_sine_proj", "sampling_offsets")}  # fmt: skip
    sd["class_labels_classifier.weight"] = torch.randn(3, 64)
    return sd


@pytest.mark.parametrize("make, needle", [
    (_deformable, "sampling_offsets"), (_dab, "ref_anchor_head"), (_mixed, "transformer.decoder.layers.0."),
    (_hf_unknown, "sampling_offsets"),
])  # fmt: skip
def test_neither_detr_nor_conditional_is_refused(tmp_path, cli, make, needle):
    torch.save({"model": make()}, tmp_path / "other.pth")
    out = tmp_path / "out.pt"
    res = cli("import-checkpoint", tmp_path / "other.pth", "--out", out, "--label-map", "coco")
    assert_one_line_error(res, "other.pth", "neither DETR's nor Conditional DETR's", needle)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["other.pth"]
