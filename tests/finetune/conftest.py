"""Fixtures for fine-tuning tests: a tiny random ESM-2 saved locally and a small FASTA."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

ESM_VOCAB = [
    "<cls>", "<pad>", "<eos>", "<unk>", "L", "A", "G", "V", "S", "E", "R", "T", "I", "D", "P", "K",
    "Q", "N", "F", "Y", "M", "H", "W", "C", "X", "B", "U", "Z", "O", ".", "-", "<null_1>", "<mask>",
]
AMINO = "LAGVSERTIDPKQNFYMHWC"


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_esm_dir(tmp_path_factory) -> Path:
    """A randomly initialised 3-layer ESM-2 (width 16) and its tokenizer, saved with save_pretrained."""
    from transformers import EsmConfig, EsmModel, EsmTokenizer

    d = tmp_path_factory.mktemp("esm2_tiny")
    (d / "vocab.txt").write_text("\n".join(ESM_VOCAB))
    EsmTokenizer(vocab_file=str(d / "vocab.txt")).save_pretrained(str(d))
    torch.manual_seed(0)
    cfg = EsmConfig(
        vocab_size=len(ESM_VOCAB), hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=128, pad_token_id=1, mask_token_id=32,
        position_embedding_type="rotary", token_dropout=True, emb_layer_norm_before=False,
    )
    EsmModel(cfg, add_pooling_layer=False).save_pretrained(str(d))
    return d


def write_fasta(path: Path, genes: list[str], *, seed: int = 0, uniprot: bool = True) -> Path:
    """Random protein sequences (lengths 20-60), UniProt-style headers (GN=SYMBOL) or plain '>SYMBOL'."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lines = []
    for i, g in enumerate(genes):
        header = f">sp|P{i:05d}|{g}_HUMAN Protein {g} OS=Homo sapiens OX=9606 GN={g} PE=1 SV=1" if uniprot else f">{g}"
        seq = "".join(rng.choice(list(AMINO), size=int(rng.integers(20, 60))))
        lines += [header, seq[:30], seq[30:]]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def fasta_writer():
    """The :func:`write_fasta` helper, as a fixture (test modules cannot import conftest by path)."""
    return write_fasta
