"""Building blocks in plain torch: attention (full, cross, criss-cross), Xpressor, embeddings.

No anndata, spatialdata or lightning imports here.
"""
from __future__ import annotations

from xscale.nn.attention import (
    Attention,
    CrossAttentionBlock,
    FeedForward,
    MLPBlock,
    SelfAttentionBlock,
    naive_attention,
    sdpa_attention,
    set_attention_backend,
)
from xscale.nn.embeddings import FourierFeatures
from xscale.nn.encoders import ENCODERS, CrissCrossEncoder, Encoder, build_encoder
from xscale.nn.xpressor import Decompressor, Xpressor

__all__ = [
    "Attention",
    "CrossAttentionBlock",
    "CrissCrossEncoder",
    "Decompressor",
    "ENCODERS",
    "Encoder",
    "FeedForward",
    "FourierFeatures",
    "MLPBlock",
    "SelfAttentionBlock",
    "Xpressor",
    "build_encoder",
    "naive_attention",
    "sdpa_attention",
    "set_attention_backend",
]
