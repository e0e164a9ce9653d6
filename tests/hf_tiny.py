"""Tiny random transformers object detectors of every DETR family, built from configs (nothing
downloads: each backbone is a small transformers backbone config, never timm, never pretrained),
with the image processor each family's checkpoints use.

:func:`tiny_config` returns the config; :func:`save_tiny` builds the model, saves it and its
processor (with a resize rule that keeps ``side`` × ``side`` images as they are) into a folder.
"""

from __future__ import annotations

from pathlib import Path

import torch

transformers = __import__("pytest").importorskip("transformers")

#: model_type → image processor class (AutoImageProcessor maps only some of them).
PROCESSORS = {
    "detr": "DetrImageProcessor",
    "conditional_detr": "ConditionalDetrImageProcessor",
    "deformable_detr": "DeformableDetrImageProcessor",
    "dab-detr": "ConditionalDetrImageProcessor",
    "rt_detr": "RTDetrImageProcessor",
    "rt_detr_v2": "RTDetrImageProcessor",
    "d_fine": "RTDetrImageProcessor",
    "deimv2": "RTDetrImageProcessor",
    "lw_detr": "DeformableDetrImageProcessor",
    "rf_detr": "RfDetrImageProcessor",
    "yolos": "YolosImageProcessor",
}
FAMILIES = list(PROCESSORS)
#: Families whose processor resizes to a fixed height × width (the others: shortest/longest edge).
FIXED_SIZE = {"rt_detr", "rt_detr_v2", "d_fine", "deimv2", "rf_detr"}

D, HEADS, FFN = 16, 2, 32


def _resnet(out_features):
    return transformers.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 8, 16, 16], depths=[1, 1, 1, 1],
                                     layer_type="basic", out_features=out_features)


#: The backbone stages a hybrid encoder reads, by the stride of its last (AIFI) level.
LEVELS = {16: [1, 2, 3], 32: [2, 3, 4]}


def _rtdetr_resnet(stride: int = 32):
    return transformers.RTDetrResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 8, 16, 16],
                                           depths=[1, 1, 1, 1], layer_type="basic", out_indices=LEVELS[stride])


def _hgnet(stride: int = 32):
    return transformers.HGNetV2Config(
        num_channels=3, embedding_size=8, depths=[1, 1, 1, 1], hidden_sizes=[16, 16, 16, 16], stem_channels=[3, 8, 8],
        stage_in_channels=[8, 16, 16, 16], stage_mid_channels=[8, 8, 8, 8], stage_out_channels=[16, 16, 16, 16],
        stage_num_blocks=[1, 1, 1, 1], stage_downsample=[False, True, True, True],
        stage_light_block=[False, False, True, True], stage_kernel_size=[3, 3, 5, 5], stage_numb_of_layers=[1, 1, 1, 1],
        out_indices=LEVELS[stride])


#: Families with DETR's single-scale encoder: their sequences guide the student when their width,
#: depth and stride are the kacli teachers' (``encoder``: ``(d_model, layers, stride)``).
SEQUENCE = ("detr", "conditional_detr", "dab-detr")
#: Families with RT-DETR's hybrid encoder: the AIFI level's projection and output guide the
#: student's ``proj`` and last layer when their width and stride are the kacli teachers'
#: (``encoder``: ``(width, -, stride)``).
AIFI = ("rt_detr", "rt_detr_v2", "d_fine", "deimv2")


def tiny_config(family: str, id2label: dict[int, str], num_queries: int = 10, side: int = 64,
                encoder: tuple[int, int, int] = (D, 1, 32)):
    """The smallest config of ``family`` (a model_type) with these classes."""
    lab = {"id2label": dict(id2label), "label2id": {v: k for k, v in id2label.items()}}
    if family in SEQUENCE:
        cls = {"detr": transformers.DetrConfig, "conditional_detr": transformers.ConditionalDetrConfig,
               "dab-detr": transformers.DabDetrConfig}[family]
        d, layers, stride = encoder
        width = {"hidden_size": d} if family == "dab-detr" else {"d_model": d}
        stage = {16: "stage3", 32: "stage4"}[stride]
        return cls(backbone_config=_resnet([stage]), num_queries=num_queries, encoder_layers=layers, decoder_layers=1,
                   encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=FFN,
                   decoder_ffn_dim=FFN, dropout=0.0, **width, **lab)
    if family == "deformable_detr":
        return transformers.DeformableDetrConfig(
            backbone_config=_resnet(["stage4"]), num_feature_levels=1, num_queries=num_queries,
            two_stage_num_proposals=num_queries, d_model=32, encoder_layers=1, decoder_layers=2,
            encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=FFN, decoder_ffn_dim=FFN,
            encoder_n_points=1, decoder_n_points=1, dropout=0.0, disable_custom_kernels=True, **lab)
    width, _, stride = encoder  # a hybrid encoder's AIFI level: its width and stride
    strides = [stride // 4, stride // 2, stride]
    if family in ("rt_detr", "rt_detr_v2"):
        cls = transformers.RTDetrConfig if family == "rt_detr" else transformers.RTDetrV2Config
        bb = _rtdetr_resnet(stride)
        kw = dict(disable_custom_kernels=True, decoder_layers=1) if family == "rt_detr" else dict(decoder_n_levels=3,
                                                                                                  decoder_layers=2)
        return cls(backbone_config=bb, encoder_in_channels=[bb.hidden_sizes[i - 1] for i in LEVELS[stride]],
                   feat_strides=strides, encoder_hidden_dim=width, encoder_layers=1, encoder_ffn_dim=FFN,
                   encoder_attention_heads=HEADS, hidden_expansion=0.5, d_model=D, decoder_in_channels=[width] * 3,
                   decoder_ffn_dim=FFN,
                   decoder_attention_heads=HEADS, decoder_n_points=1, num_queries=num_queries, num_denoising=0,
                   **kw, **lab)
    if family in ("d_fine", "deimv2"):
        cls = transformers.DFineConfig if family == "d_fine" else transformers.Deimv2Config
        bb = _hgnet(stride)
        return cls(backbone_config=bb, encoder_in_channels=[bb.stage_out_channels[i - 1] for i in LEVELS[stride]],
                   feat_strides=strides, encoder_hidden_dim=width, encoder_layers=1, encoder_ffn_dim=FFN,
                   encoder_attention_heads=HEADS, hidden_expansion=0.5, depth_mult=0.34, d_model=D,
                   decoder_in_channels=[width] * 3, decoder_ffn_dim=FFN,
                   decoder_layers=2, decoder_attention_heads=HEADS, decoder_n_points=1, num_queries=num_queries,
                   num_denoising=0, lqe_hidden_dim=8, **lab)
    if family == "lw_detr":
        bb = transformers.LwDetrViTConfig(hidden_size=D, num_hidden_layers=2, num_attention_heads=HEADS, mlp_ratio=2,
                                          image_size=side, pretrain_image_size=side, patch_size=16,
                                          window_block_indices=[], num_windows=1, out_indices=[2])
        return transformers.LwDetrConfig(backbone_config=bb, projector_scale_factors=[1.0], hidden_expansion=0.5,
                                         c2f_num_blocks=1, d_model=D, decoder_ffn_dim=FFN, decoder_n_points=1,
                                         decoder_layers=1, decoder_self_attention_heads=HEADS,
                                         decoder_cross_attention_heads=HEADS, num_queries=num_queries, group_detr=1,
                                         **lab)
    if family == "rf_detr":
        bb = transformers.RfDetrDinov2Config(hidden_size=D, num_hidden_layers=2, num_attention_heads=HEADS, mlp_ratio=2,
                                             image_size=side, patch_size=16, num_windows=1, out_features=["stage2"])
        return transformers.RfDetrConfig(backbone_config=bb, hidden_expansion=0.5, c2f_num_blocks=1, d_model=D,
                                         decoder_ffn_dim=FFN, decoder_n_points=1, decoder_layers=1,
                                         decoder_self_attention_heads=HEADS, decoder_cross_attention_heads=HEADS,
                                         num_queries=num_queries, group_detr=1, dropout=0.0, intermediate_size=FFN,
                                         **lab)
    if family == "yolos":
        return transformers.YolosConfig(hidden_size=D, num_hidden_layers=1, num_attention_heads=HEADS,
                                        intermediate_size=FFN, image_size=[side, side], patch_size=16,
                                        num_detection_tokens=num_queries, use_mid_position_embeddings=False, **lab)
    raise ValueError(f"unknown family {family!r}")


def processor(family: str, side: int = 64):
    """The family's image processor, resizing a ``side`` × ``side`` image to itself."""
    size = {"height": side, "width": side} if family in FIXED_SIZE else {"shortest_edge": side, "longest_edge": side}
    return getattr(transformers, PROCESSORS[family])(size=size)


def save_tiny(folder: Path, family: str, id2label: dict[int, str], seed: int = 0, side: int = 64, gain: float = 3.0,
              encoder: tuple[int, int, int] = (D, 1, 32)):
    """A tiny random ``family`` detector and its processor saved in ``folder``; returns the model.
    The class head's weights are scaled by ``gain`` so that the classes' probabilities differ, and
    an unnamed slot (``N/A``) gets a bias 3 lower, so that it does not take every top detection."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForObjectDetection.from_config(
        tiny_config(family, id2label, side=side, encoder=encoder)).eval()
    k = len(id2label)
    unnamed = [i for i, n in id2label.items() if n == "N/A"]
    with torch.no_grad():
        for name, t in model.named_parameters():
            if "class" in name or "score" in name:
                if t.dim() == 2:
                    t.mul_(gain)
                elif t.dim() == 1 and t.shape[0] in (k, k + 1):
                    t[unnamed] -= 3.0
    model.save_pretrained(folder)
    processor(family, side).save_pretrained(folder)
    return model
