"""Foreign DETR checkpoints: facebookresearch/detr, UP-DETR and HF transformers layouts built here
from our own model's weights must import to a model that computes the same outputs."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torchvision.ops import box_convert

from kacli.errors import KacliError
from kacli.models import DETR, ModelConfig
from kacli.models.checkpoint import build_model, load_checkpoint, save_checkpoint
from kacli.models.postprocess import postprocess
from kacli.models.import_detr import COCO_NAMES, import_checkpoint, init_from_checkpoint, read_safetensors
from conftest import assert_one_line_error

COCO_UNUSED = [0, 12, 26, 29, 30, 45, 66, 68, 69, 71, 83]


def small_cfg(**kw) -> ModelConfig:
    base = dict(backbone="resnet18", d_model=64, nheads=4, enc_layers=2, dec_layers=2, dim_feedforward=96,
                num_queries=5, dropout=0.0)  # fmt: skip
    base.update(kw)
    return ModelConfig(**base)


def random_detr(cfg: ModelConfig, num_classes: int, seed: int = 0) -> DETR:
    """A DETR whose every tensor is random (LayerNorms, biases, frozen BN statistics included), so a
    swapped or misnamed tensor changes the outputs."""
    torch.manual_seed(seed)
    model = DETR(cfg, num_classes).eval()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(torch.rand_like(t) + 0.5)
            elif name.endswith(("norm1.weight", "norm2.weight", "norm3.weight", "norm.weight")) or re.search(r"bn\d\.weight|downsample\.1\.weight", name):
                t.copy_(1 + 0.2 * torch.randn_like(t))
            else:
                t.add_(0.05 * torch.randn_like(t))
    return model


def inputs():
    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, 96)
    mask = torch.zeros(2, 64, 96, dtype=torch.bool)
    mask[1, 48:, :] = True
    mask[1, :, 64:] = True
    return x, mask


@torch.no_grad()
def outputs(model):
    x, mask = inputs()
    return model.eval()(x, mask)


# -- layouts, written independently of the importer ------------------------------------------------


def to_detr_layout(sd: dict) -> dict:
    return {("backbone.0." + k[len("backbone."):] if k.startswith("backbone.body.") else k): v.clone() for k, v in sd.items()}


def hf_resnet_name(name: str) -> str:
    """torchvision ResNet names → HF ResNet (``use_timm_backbone=False``) names."""
    if m := re.match(r"^(conv1|bn1)\.(.+)$", name):
        kind = "convolution" if m[1] == "conv1" else "normalization"
        return f"embedder.embedder.{kind}.{m[2]}"
    m = re.match(r"^layer(\d)\.(\d+)\.(conv\d|bn\d|downsample\.[01])\.(.+)$", name)
    stage, block, mod, param = int(m[1]) - 1, m[2], m[3], m[4]
    base = f"encoder.stages.{stage}.layers.{block}."
    if mod.startswith("downsample"):
        return base + ("shortcut.convolution." if mod.endswith("0") else "shortcut.normalization.") + param
    kind = "convolution" if mod.startswith("conv") else "normalization"
    return base + f"layer.{int(mod[-1]) - 1}.{kind}.{param}"


def to_hf_layout(sd: dict, version: str = "v4", backbone: str = "timm") -> dict:
    """Our names → HF transformers DetrForObjectDetection names (q/k/v split)."""
    bb = "model.backbone.conv_encoder.model." if version == "v4" else "model.backbone.model."
    o_proj = "out_proj" if version == "v4" else "o_proj"
    fc = "" if version == "v4" else "mlp."
    out = {}
    for k, v in sd.items():
        v = v.clone()
        if k.startswith("backbone.body."):
            name = k[len("backbone.body."):]
            out[bb + (hf_resnet_name(name) if backbone == "hf" else name)] = v
        elif k.startswith("input_proj."):
            out["model.input_projection." + k[len("input_proj."):]] = v
        elif k == "query_embed.weight":
            out["model.query_position_embeddings.weight"] = v
        elif k.startswith("class_embed."):
            out["class_labels_classifier." + k[len("class_embed."):]] = v
        elif k.startswith("bbox_embed."):
            out["bbox_predictor." + k[len("bbox_embed."):]] = v
        elif k.startswith("transformer.decoder.norm."):
            out["model.decoder.layernorm." + k[len("transformer.decoder.norm."):]] = v
        else:
            part, i, sub = re.match(r"^transformer\.(encoder|decoder)\.layers\.(\d+)\.(.+)$", k).groups()
            base = f"model.{part}.layers.{i}."
            head, rest = sub.split(".", 1)
            if head in ("self_attn", "multihead_attn"):
                hf = "self_attn" if head == "self_attn" else "encoder_attn"
                if rest.startswith("in_proj_"):
                    for which, t in zip("qkv", v.chunk(3)):
                        out[f"{base}{hf}.{which}_proj.{rest[len('in_proj_'):]}"] = t.clone()
                else:
                    out[f"{base}{hf}.{o_proj}.{rest.split('.', 1)[1]}"] = v
            else:
                names = {
                    "norm1": "self_attn_layer_norm",
                    "norm2": "final_layer_norm" if part == "encoder" else "encoder_attn_layer_norm",
                    "norm3": "final_layer_norm",
                    "linear1": fc + "fc1",
                    "linear2": fc + "fc2",
                }
                out[base + names[head] + "." + rest] = v
    return out


def write_safetensors(path: Path, tensors: dict) -> None:
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for k, t in tensors.items():
        b = t.contiguous().numpy().tobytes()
        header[k] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    h = json.dumps(header).encode()
    path.write_bytes(len(h).to_bytes(8, "little") + h + b"".join(blobs))


def all_named(k: int, path: Path) -> Path:
    """A label map naming every slot of a k-class head: ids 0..k-1."""
    path.write_text(yaml.safe_dump([{"id": i, "name": f"c{i}"} for i in range(k)]))
    return path


class NeedsCode:  # pickled by reference: loading it would run code
    pass


@pytest.fixture(scope="module")
def post91():
    """A post-norm, 4-head DETR with DETR's 92-output COCO head, and its outputs on :func:`inputs`."""
    model = random_detr(small_cfg(nheads=4), 91)
    return model, outputs(model)


def with_classes(state: dict, k: int) -> dict:
    """The same weights with a k-class head (the first k rows and the no-object row)."""
    rows = list(range(k)) + [state["class_embed.weight"].shape[0] - 1]
    out = dict(state)
    out["class_embed.weight"], out["class_embed.bias"] = state["class_embed.weight"][rows], state["class_embed.bias"][rows]
    return out


def assert_same(got, ref, kept):
    """The kept classes' logits, their probabilities (the softmax over *all* the original logits,
    unnamed slots included) and every box are the original model's; ``kept`` ends with "no object"."""
    for a, b in [(got, ref), *zip(got["aux_outputs"], ref["aux_outputs"])]:
        assert a["pred_logits"].shape[-1] == len(kept)
        torch.testing.assert_close(a["pred_logits"][..., :-1], b["pred_logits"][..., kept[:-1]], atol=1e-5, rtol=0)
        torch.testing.assert_close(
            a["pred_logits"].softmax(-1)[..., :-1], b["pred_logits"].softmax(-1)[..., kept[:-1]], atol=1e-6, rtol=0
        )
        torch.testing.assert_close(a["pred_boxes"], b["pred_boxes"], atol=1e-5, rtol=0)


# -- facebookresearch/detr, UP-DETR --------------------------------------------------------------


def test_detr_layout_with_coco_label_map_gives_the_same_outputs(tmp_path, post91):
    model, ref = post91
    sd = to_detr_layout(model.state_dict())
    extra = {"patch2query.weight": torch.randn(64, 512), "patch2query.bias": torch.randn(64),
             "feature_align.layers.0.weight": torch.randn(64, 64)}  # UP-DETR pretraining-only
    sd.update(extra)
    torch.save({"model": sd, "args": argparse.Namespace(nheads=4, dilation=False, dropout=0.0)}, tmp_path / "up.pth")

    rep = import_checkpoint(tmp_path / "up.pth", tmp_path / "out.pt", "coco")
    assert rep["layout"] == "facebookresearch/detr"
    assert sorted(rep["ignored"]) == sorted(extra)
    a = rep["arch"]
    assert (a["backbone"], a["d_model"], a["nheads"], a["enc_layers"], a["dec_layers"]) == ("resnet18", 64, 4, 2, 2)
    assert (a["dim_feedforward"], a["num_queries"], a["pre_norm"], a["dilation"]) == (96, 5, False, False)
    assert rep["dropped_slots"] == COCO_UNUSED

    ck = load_checkpoint(tmp_path / "out.pt")
    assert ck["kind"] == "detr" and len(ck["label_map"]["ids"]) == 80
    assert ck["label_map"]["ids"][:3] == [1, 2, 3] and ck["label_map"]["names"][:3] == ["person", "bicycle", "car"]
    assert ck["label_map"]["ids"][-1] == 90 and ck["label_map"]["names"][-1] == "toothbrush"
    assert len([n for n in COCO_NAMES if n != "N/A"]) == 80
    # Class index k is COCO id k; 91 is "no object". Dropping the unused slots keeps every other logit.
    assert_same(outputs(build_model(ck)), ref, ck["label_map"]["ids"] + [91])


def detr_postprocess(outputs, target_sizes):
    """facebookresearch/detr's PostProcess (models/detr.py), verbatim in substance: softmax over all
    logits, drop the last ("no object"), max; boxes cxcywh → xyxy scaled to the image."""
    prob = F.softmax(outputs["pred_logits"], -1)
    scores, labels = prob[..., :-1].max(-1)
    boxes = box_convert(outputs["pred_boxes"], "cxcywh", "xyxy")
    img_h, img_w = target_sizes.unbind(1)
    boxes = boxes * torch.stack([img_w, img_h, img_w, img_h], dim=1)[:, None, :]
    return [{"scores": s, "labels": l, "boxes": b} for s, l, b in zip(scores, labels, boxes)]


def test_imported_coco_scores_equal_detrs_postprocess(tmp_path):
    """With --label-map coco the 11 unnamed slots stay in the softmax: every query DETR labels with
    a COCO category gets DETR's own score, label and box; no unnamed id is ever predicted."""
    model = random_detr(small_cfg(num_queries=40), 91, seed=5)
    seen = {}
    hook = model.class_embed.register_forward_hook(lambda m, i, o: seen.setdefault("hs", i[0][-1].flatten(0, 1)))
    outputs(model)
    hook.remove()
    hs = seen["hs"]  # (B·Q, d): the last decoder layer's states, nearly alike across queries
    with torch.no_grad():  # a class head that tells the queries apart: varied labels and scores up to 0.9
        w = torch.randn(92, hs.shape[1], generator=torch.Generator().manual_seed(0)) * 2 / hs.std(0) / hs.shape[1] ** 0.5
        model.class_embed.weight.copy_(w)
        model.class_embed.bias.copy_(-w @ hs.mean(0))
    torch.save({"model": to_detr_layout(model.state_dict())}, tmp_path / "detr.pth")
    import_checkpoint(tmp_path / "detr.pth", tmp_path / "coco.pt", "coco", heads=4)
    ck = load_checkpoint(tmp_path / "coco.pt")
    ids = torch.tensor(ck["label_map"]["ids"])
    sizes = torch.tensor([[480, 640], [333, 500]])

    def both(detr_model, ours):
        ref = detr_postprocess(outputs(detr_model), sizes)
        got = postprocess(outputs(ours), sizes)
        return ref, got

    ref, got = both(model, build_model(ck))
    named = 0
    for r, g in zip(ref, got):
        g_ids = ids[g["labels"]]
        assert not set(g_ids.tolist()) & set(COCO_UNUSED)
        hit = ~torch.isin(r["labels"], torch.tensor(COCO_UNUSED))
        named += int(hit.sum())
        assert torch.equal(g_ids[hit], r["labels"][hit])
        torch.testing.assert_close(g["scores"][hit], r["scores"][hit], atol=1e-6, rtol=0)
        torch.testing.assert_close(g["boxes"], r["boxes"], atol=1e-3, rtol=0)
        # DETR's best slot was unnamed: reported here as the best named class, at its own probability.
        assert (g["scores"][~hit] < r["scores"][~hit]).all()
    assert 60 <= named < 80  # both kinds of query occur

    # --init from the imported checkpoint into an 80-class DETR keeps its named classes' head.
    student = DETR(small_cfg(num_queries=40), 80)
    assert init_from_checkpoint(student, tmp_path / "coco.pt", 80)["class_head"] == "loaded"
    assert torch.equal(student.class_embed.weight, ck["model"]["class_embed.weight"][:81])

    # A trained DETR never puts a query's best probability on an unused id: then every detection,
    # hence AP, is DETR's.
    with torch.no_grad():
        model.class_embed.bias[COCO_UNUSED] -= 30
    torch.save({"model": to_detr_layout(model.state_dict())}, tmp_path / "detr.pth")
    import_checkpoint(tmp_path / "detr.pth", tmp_path / "coco.pt", "coco", heads=4, force=True)  # replaces the first import
    ref, got = both(model, build_model(load_checkpoint(tmp_path / "coco.pt")))
    for r, g in zip(ref, got):
        assert torch.equal(ids[g["labels"]], r["labels"])
        torch.testing.assert_close(g["scores"], r["scores"], atol=1e-6, rtol=0)


def test_pre_norm_detected_and_default_heads(tmp_path):
    model = random_detr(small_cfg(pre_norm=True, nheads=8, num_queries=3), 4, seed=3)  # no args: DETR's 8 heads
    sd = to_detr_layout(model.state_dict())
    assert "transformer.encoder.norm.weight" in sd
    torch.save(sd, tmp_path / "bare.pth")  # a bare state dict, no {"model": ...}
    rep = import_checkpoint(tmp_path / "bare.pth", tmp_path / "out.pt", all_named(4, tmp_path / "lm.yaml"))
    assert rep["arch"]["pre_norm"] is True and rep["arch"]["nheads"] == 8 and rep["arch"]["num_queries"] == 3
    assert rep["label_map"]["ids"] == [0, 1, 2, 3] and rep["dropped_slots"] == []
    assert_same(outputs(build_model(load_checkpoint(tmp_path / "out.pt"))), outputs(model), [0, 1, 2, 3, 4])

    # The same weights without encoder.norm are read as post-norm.
    sd.pop("transformer.encoder.norm.weight"), sd.pop("transformer.encoder.norm.bias")
    torch.save(sd, tmp_path / "post.pth")
    rep = import_checkpoint(tmp_path / "post.pth", tmp_path / "post.pt", tmp_path / "lm.yaml")
    assert rep["arch"]["pre_norm"] is False


def test_label_map_file_keeps_the_named_slots(tmp_path, post91):
    model, ref = post91
    torch.save({"model": to_detr_layout(model.state_dict())}, tmp_path / "d.pth")
    (tmp_path / "map.json").write_text(json.dumps({"5": "kite", "2": "ball", "7": "N/A"}))
    rep = import_checkpoint(tmp_path / "d.pth", tmp_path / "a.pt", tmp_path / "map.json", heads=4)
    assert rep["label_map"]["ids"] == [2, 5] and rep["label_map"]["names"] == ["ball", "kite"]
    assert len(rep["dropped_slots"]) == 89 and 7 in rep["dropped_slots"]
    assert_same(outputs(build_model(load_checkpoint(tmp_path / "a.pt"))), ref, [2, 5, 91])


# -- HF transformers -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "version, backbone, container",
    [("v4", "timm", "bin"), ("v5", "timm", "safetensors"), ("v4", "hf", "safetensors")],
)
def test_hf_layout_gives_the_same_outputs(tmp_path, post91, version, backbone, container):
    model, ref = post91
    hf = to_hf_layout(model.state_dict(), version, backbone)
    assert not any(k.endswith("in_proj_weight") for k in hf)
    folder = tmp_path / "hf-detr"
    folder.mkdir()
    if container == "bin":
        torch.save(hf, folder / "pytorch_model.bin")
    else:
        write_safetensors(folder / "model.safetensors", hf)
        assert set(read_safetensors(folder / "model.safetensors")) == set(hf)
    id2label = {"0": "N/A", "1": "cat", "2": "dog", "3": "N/A", "4": "bird"}
    (folder / "config.json").write_text(json.dumps({"model_type": "detr", "encoder_attention_heads": 4, "id2label": id2label}))

    rep = import_checkpoint(folder, tmp_path / "out.pt")  # label map from config.json's id2label
    assert rep["layout"] == "hf-transformers" and rep["ignored"] == []
    assert rep["arch"]["nheads"] == 4 and rep["arch"]["backbone"] == "resnet18" and rep["arch"]["pre_norm"] is False
    assert rep["label_map"]["ids"] == [1, 2, 4] and rep["label_map"]["names"] == ["cat", "dog", "bird"]
    assert_same(outputs(build_model(load_checkpoint(tmp_path / "out.pt"))), ref, [1, 2, 4, 91])


# -- bad input: one line, exit 2, nothing written ------------------------------------------------------


def test_bad_inputs_one_line_and_nothing_written(tmp_path, cli, post91):
    out = tmp_path / "out.pt"
    (tmp_path / "text.pth").write_text("not a checkpoint\n")
    assert_one_line_error(cli("import-checkpoint", tmp_path / "text.pth", "--out", out), "text.pth", "not a")
    assert not out.exists()

    sd = to_detr_layout(with_classes(post91[0].state_dict(), 3))
    torch.save({"model": sd, "extra": NeedsCode()}, tmp_path / "code.pth")
    assert_one_line_error(cli("import-checkpoint", tmp_path / "code.pth", "--out", out), "needs code")

    import torchvision

    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "resnet.pth")
    assert_one_line_error(cli("import-checkpoint", tmp_path / "resnet.pth", "--out", out), "not a DETR or Conditional DETR state dict")

    torch.save({"model": sd}, tmp_path / "d.pth")
    assert_one_line_error(cli("import-checkpoint", tmp_path / "d.pth", "--out", out), "3 classes", "--label-map")
    assert_one_line_error(cli("import-checkpoint", tmp_path / "d.pth", "--out", out, "--label-map", "coco"),
                          "does not fit", "3 classes")  # fmt: skip
    (tmp_path / "dup.yaml").write_text("- {id: 1, name: a}\n- {id: 1, name: b}\n")
    assert_one_line_error(cli("import-checkpoint", tmp_path / "d.pth", "--out", out, "--label-map", tmp_path / "dup.yaml"),
                          "dup.yaml", "twice")  # fmt: skip
    assert_one_line_error(cli("import-checkpoint", tmp_path / "missing.pth", "--out", out), "not found")
    assert not out.exists()

    out.write_bytes(b"old")  # an existing output is left alone on error: without --force, and with it
    assert_one_line_error(cli("import-checkpoint", tmp_path / "resnet.pth", "--out", out), "exists", "--force")
    assert_one_line_error(cli("import-checkpoint", tmp_path / "resnet.pth", "--out", out, "--force"), "not a DETR")
    assert out.read_bytes() == b"old"


def test_cli_import_prints_a_summary(tmp_path, cli, post91):
    torch.save({"model": to_detr_layout(post91[0].state_dict())}, tmp_path / "d.pth")
    res = cli("import-checkpoint", tmp_path / "d.pth", "--out", tmp_path / "o.pt", "--heads", "4")  # coco by default
    assert res.exit_code == 0, res.stderr
    assert "resnet18" in res.stdout and "4 heads" in res.stdout and "80 from coco" in res.stdout and "wrote" in res.stdout
    assert load_checkpoint(tmp_path / "o.pt")["arch"]["nheads"] == 4


# -- --init ------------------------------------------------------------------------------------------


def test_init_reinitialises_the_class_head_when_the_class_count_differs(tmp_path, post91):
    src = post91[0].state_dict()
    sd = to_detr_layout(src)
    sd["patch2query.weight"] = torch.randn(64, 512)
    torch.save({"model": sd}, tmp_path / "updetr.pth")

    model = DETR(small_cfg(), 3)
    with torch.no_grad():
        model.class_embed.weight.zero_()
    rep = init_from_checkpoint(model, tmp_path / "updetr.pth", 3)
    assert rep["class_head"] == "reinitialised" and rep["layout"] == "facebookresearch/detr"
    assert rep["ignored"] == ["patch2query.weight"]
    assert {s["key"] for s in rep["skipped"]} == {"class_embed.weight", "class_embed.bias"}
    assert set(rep["missing"]) == {"class_embed.weight", "class_embed.bias"}
    assert model.class_embed.weight.abs().sum() > 0  # re-initialised, not left as it was
    own = model.state_dict()
    assert len(rep["loaded"]) == len(own) - 2
    for k in rep["loaded"]:
        assert torch.equal(own[k], src[k]), k


def test_init_keeps_the_class_head_when_the_class_count_matches(tmp_path, post91):
    cfg = small_cfg()
    src = DETR(cfg, 3)
    src.load_state_dict(with_classes(post91[0].state_dict(), 3))
    save_checkpoint(tmp_path / "t.pt", {"kind": "detr", "arch": cfg.to_dict(), "model": src.state_dict(),
                                        "label_map": {"ids": [1, 2, 3], "names": ["a", "b", "c"]}})  # fmt: skip
    model = DETR(cfg, 3)
    rep = init_from_checkpoint(model, tmp_path / "t.pt", 3)
    assert rep["class_head"] == "loaded" and rep["layout"] == "kacli" and rep["skipped"] == [] and rep["missing"] == []
    for k, v in model.state_dict().items():
        assert torch.equal(v, src.state_dict()[k]), k

    # A run folder works too; a model of another architecture is an error.
    (tmp_path / "run").mkdir()
    (tmp_path / "t.pt").rename(tmp_path / "run" / "best.pt")
    assert init_from_checkpoint(DETR(cfg, 3), tmp_path / "run", 3)["class_head"] == "loaded"
    tiny = DETR(ModelConfig(backbone="tiny", d_model=32, nheads=4, enc_layers=1, dec_layers=1, dim_feedforward=48,
                            num_queries=3, tiny_widths=(8, 8, 16, 16)), 3)  # fmt: skip
    with pytest.raises(KacliError, match="does not fit the model"):
        init_from_checkpoint(tiny, tmp_path / "run", 3)
