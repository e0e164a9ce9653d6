"""Conditional DETR (model.arch: conditional): the decoder against its formulas, boxes from reference
points, the sigmoid post-processing, and the student built on it."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kacli.errors import KacliError
from kacli.models.conditional import ConditionalDecoder, inverse_sigmoid, point_sine_embedding
from kacli.models.config import ModelConfig, model_config
from kacli.models.detr import DETR
from kacli.models.position import PositionEmbeddingSine
from kacli.models.postprocess import postprocess
from kacli.models.student import Student

SMALL = {"preset": "tiny-conditional", "tiny_widths": [8, 8, 16, 16], "d_model": 16, "nheads": 2, "enc_layers": 2,
         "dec_layers": 2, "dim_feedforward": 32, "num_queries": 4}


def _images(B=2, H=64, W=64, pad=True):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, 3, H, W, generator=g)
    mask = torch.zeros(B, H, W, dtype=torch.bool)
    if pad and B > 1:
        mask[1, :, 40:] = True
        x[1, :, :, 40:] = 0
    return x, mask


def test_point_encoding_is_the_encoders_encoding_of_the_same_position():
    """PE(s) of a reference point at a token's normalised position equals the encoder's sine
    encoding of that token, so the conditional spatial query and the keys speak one language."""
    h, w, d = 3, 5, 16
    mask = torch.zeros(1, h, w, dtype=torch.bool)
    grid = PositionEmbeddingSine(d // 2)(mask)[0]  # (h, w, d)
    ys, xs = torch.meshgrid(torch.arange(1, h + 1) / h, torch.arange(1, w + 1) / w, indexing="ij")
    points = torch.stack([xs, ys], dim=-1)  # (h, w, 2) as (x, y)
    torch.testing.assert_close(point_sine_embedding(points, d), grid, atol=2e-5, rtol=0)
    # and by the formula for one coordinate pair: y's first pair is (sin 2πy, cos 2πy)
    pe = point_sine_embedding(torch.tensor([[0.25, 0.1]]), d)[0]
    torch.testing.assert_close(pe[:2], torch.tensor([math.sin(2 * math.pi * 0.1), math.cos(2 * math.pi * 0.1)]))
    torch.testing.assert_close(pe[8:10], torch.tensor([math.sin(2 * math.pi * 0.25), math.cos(2 * math.pi * 0.25)]))


def _cross_attention_oracle(layer, x, memory, pos, query_pos, sine, nheads, first):
    """Per head, softmax over keys of [q_c; q_s]·[k_c; k_p] / sqrt(2d/h), times v (the paper's Eq.)."""
    d = x.shape[-1]
    dh = d // nheads
    qc = layer.ca_qcontent_proj(x) + (layer.ca_qpos_proj(query_pos) if first else 0)
    kp = layer.ca_kpos_proj(pos)
    kc = layer.ca_kcontent_proj(memory) + (kp if first else 0)
    qs = layer.ca_qpos_sine_proj(sine)
    v = layer.ca_v_proj(memory)
    heads = []
    for i in range(nheads):
        sl = slice(i * dh, (i + 1) * dh)
        q = torch.cat([qc[..., sl], qs[..., sl]], dim=-1)
        k = torch.cat([kc[..., sl], kp[..., sl]], dim=-1)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(2 * dh), dim=-1)
        heads.append(a @ v[..., sl])
    return layer.cross_attn.out_proj(torch.cat(heads, dim=-1))


@pytest.mark.parametrize("first", [True, False])
def test_conditional_cross_attention_is_the_papers_formula(first):
    torch.manual_seed(0)
    d, h = 8, 2
    dec = ConditionalDecoder(2, d, h, 16, 0.0, pre_norm=False).eval()
    layer = dec.layers[0 if first else 1]
    assert (layer.ca_qpos_proj is not None) == first  # only the first layer adds the query position
    x, memory, pos = torch.randn(1, 3, d), torch.randn(1, 5, d), torch.randn(1, 5, d)
    query_pos, sine = torch.randn(1, 3, d), torch.randn(1, 3, d)
    got = layer._cross_attention(x, memory, None, pos, query_pos, sine)
    torch.testing.assert_close(got, _cross_attention_oracle(layer, x, memory, pos, query_pos, sine, h, first))


def test_the_decoders_spatial_query_is_scaled_by_the_content_after_the_first_layer():
    torch.manual_seed(1)
    d = 8
    dec = ConditionalDecoder(2, d, 2, 16, 0.0, pre_norm=False).eval()
    tgt, memory, pos, query_pos = torch.zeros(1, 3, d), torch.randn(1, 5, d), torch.randn(1, 5, d), torch.randn(1, 3, d)
    hs, ref = dec(tgt, memory, None, pos, query_pos)
    torch.testing.assert_close(ref, dec.ref_point_head(query_pos).sigmoid())
    sine = point_sine_embedding(ref, d)
    x0 = dec.layers[0](tgt, memory, None, pos, query_pos, sine)  # λ_q = 1
    x1 = dec.layers[1](x0, memory, None, pos, query_pos, sine * dec.query_scale(x0))
    torch.testing.assert_close(hs, torch.stack([dec.norm(x0), dec.norm(x1)]))


def test_boxes_start_at_the_reference_points():
    cfg = model_config(SMALL)
    torch.manual_seed(0)
    model = DETR(cfg, 3).eval()
    x, mask = _images()
    out = model(x, mask)
    assert out["pred_logits"].shape == (2, 4, 3)  # one sigmoid per class, no "no object"
    ref = model.transformer.decoder.ref_point_head(model.query_embed.weight).sigmoid()
    # the box head's last layer starts at zero: centre = reference point, size σ(0) = 0.5
    torch.testing.assert_close(out["pred_boxes"][0, :, :2], ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(out["pred_boxes"][..., 2:], torch.full((2, 4, 2), 0.5))
    # every class starts at the focal prior 0.01 (the bias), moved only by the features
    assert model.class_embed.bias.sigmoid().allclose(torch.tensor(0.01))


def test_boxes_are_offsets_from_the_reference_point_in_inverse_sigmoid_space():
    cfg = model_config(SMALL)
    torch.manual_seed(0)
    model = DETR(cfg, 3).eval()
    torch.nn.init.normal_(model.bbox_embed.layers[-1].weight, std=0.3)
    x, mask = _images()
    captured = {}
    model.bbox_embed.register_forward_hook(lambda m, i, o: captured.setdefault("offset", o))
    out = model(x, mask)
    ref = model.transformer.decoder.ref_point_head(model.query_embed.weight).sigmoid()
    expected = (captured["offset"][-1] + F.pad(inverse_sigmoid(ref), (0, 2))).sigmoid()
    torch.testing.assert_close(out["pred_boxes"], expected)


def test_sigmoid_postprocessing_keeps_the_top_query_class_pairs():
    logits = torch.tensor([[[2.0, -1.0], [0.5, 1.0], [-3.0, -2.0]]])  # (1, Q=3, K=2)
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.25, 0.25, 0.5, 0.5], [0.1, 0.1, 0.1, 0.1]]])
    res = postprocess({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[100, 200]]), "sigmoid")[0]
    # all 6 (query, class) pairs, by σ: (0,0) 2.0, (1,1) 1.0, (1,0) 0.5, (0,1) -1, (2,1) -2, (2,0) -3
    torch.testing.assert_close(res["scores"], torch.tensor([2.0, 1.0, 0.5, -1.0, -2.0, -3.0]).sigmoid())
    assert res["labels"].tolist() == [0, 1, 0, 1, 1, 0]
    torch.testing.assert_close(res["boxes"][1], torch.tensor([0.0, 0.0, 100.0, 50.0]))  # query 1, pixels
    torch.testing.assert_close(res["boxes"][2], res["boxes"][1])  # the same query with its other class
    # softmax models keep one detection per query
    sm = postprocess({"pred_logits": torch.zeros(1, 3, 3), "pred_boxes": boxes}, torch.tensor([[100, 200]]))[0]
    assert sm["scores"].shape == (3,)


def test_student_on_conditional_detr_is_detr_with_one_part_and_decouples_parts():
    cfg = model_config(SMALL)
    torch.manual_seed(0)
    detr = DETR(cfg, 3).eval()
    student = Student(cfg, 3, 1).eval()
    sd = {("input_projs.0." + k[len("input_proj."):] if k.startswith("input_proj.") else k): v
          for k, v in detr.state_dict().items()}
    student.load_state_dict(sd)
    x, mask = _images()
    a, b = detr(x, mask), student(x, mask)
    torch.testing.assert_close(a["pred_logits"], b["pred_logits"])
    torch.testing.assert_close(a["pred_boxes"], b["pred_boxes"])
    two = Student(cfg, 3, 2).eval()
    fast, dense = two(x, mask), two(x, mask, dense_oracle=True)
    torch.testing.assert_close(fast["pred_logits"], dense["pred_logits"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fast["pred_boxes"], dense["pred_boxes"], atol=1e-5, rtol=1e-4)
    slim = Student(cfg, 3, 2, compress="redundancy").eval()
    assert slim(x, mask)["pred_logits"].shape == (2, 4, 3)


def test_arch_is_checked_and_recorded_only_when_not_detr():
    assert "arch" not in model_config("tiny").to_dict()  # DETR checkpoints read as before
    cfg = model_config("tiny-conditional")
    assert cfg.to_dict()["arch"] == "conditional" and cfg.classifier == "sigmoid"
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert model_config({"preset": "tiny", "arch": "conditional"}).classifier == "sigmoid"
    assert model_config("conditional-r50").num_queries == 300
    with pytest.raises(KacliError, match="arch 'deformable' is not one of detr, conditional"):
        model_config({"preset": "tiny", "arch": "deformable"})
    with pytest.raises(KacliError, match="unnamed_classes is for softmax classifiers"):
        model_config({"preset": "tiny-conditional", "unnamed_classes": 2})
