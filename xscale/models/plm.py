"""Gene tokens from outside the cell model: a fixed table, or a protein language model.

Two :class:`~xscale.models.gene_embedders.GeneEmbedder` variants, registered as
``"table"`` and ``"protein-lm"``:

- :class:`TableGeneEmbedder` reads one vector per gene symbol from a file (for example
  per-gene protein embeddings computed elsewhere), gives genes missing from the file a
  learned fallback row, and maps the table's width E to the model width D with a
  trainable adapter. The table itself can be frozen (default) or trained.
- :class:`ProteinLMGeneEmbedder` runs a protein language model with the ESM-2
  architecture (``transformers.EsmModel``) on each gene's protein sequence and
  mean-pools the residue embeddings. Its last ``n_trainable_layers`` layers train
  jointly with the cell model (cross-scale fine-tuning); when it is fully frozen the
  per-gene vectors are computed once and cached.

Nothing is ever downloaded: both read local files only.

Getting real inputs (on a machine with internet access)
-------------------------------------------------------
ESM-2 weights: save a checkpoint from the Hugging Face hub into a directory once, then
pass that directory as ``model_dir``::

    from transformers import EsmModel, EsmTokenizer
    name = "facebook/esm2_t6_8M_UR50D"  # or esm2_t12_35M / t30_150M / t33_650M
    EsmModel.from_pretrained(name, add_pooling_layer=False).save_pretrained("esm2_t6_8M")
    EsmTokenizer.from_pretrained(name).save_pretrained("esm2_t6_8M")

Protein sequences: download a UniProt FASTA of reviewed canonical proteins for the
species, e.g. ``https://rest.uniprot.org/uniprotkb/stream?format=fasta&query=
(organism_id:9606)+AND+(reviewed:true)`` (human; 10090 for mouse). Headers carry the
gene symbol as ``GN=SYMBOL``, which is how sequences are matched to genes; a plain
``>SYMBOL`` header works too. The first record per symbol is used.

A table file for :class:`TableGeneEmbedder` can be made from such a model with
:func:`save_gene_table` (or any tool writing .npz / .tsv / .safetensors).
"""
from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from xscale.data.vocab import normalize_symbol
from xscale.errors import XscaleInputError
from xscale.models.gene_embedders import GeneEmbedder, register_gene_embedder
from xscale.models.gene_files import read_fasta, read_gene_table, save_gene_table  # files: their own module

log = logging.getLogger(__name__)

Adapter = Literal["linear", "mlp"]


__all__ = ["ProteinLMGeneEmbedder", "TableGeneEmbedder", "read_fasta", "read_gene_table", "save_gene_table"]


def _adapter(width: int, dim: int, kind: Adapter) -> nn.Module:
    if kind == "linear":
        return nn.Sequential(nn.LayerNorm(width), nn.Linear(width, dim))  # (.., E) -> (.., D)
    if kind == "mlp":
        return nn.Sequential(nn.LayerNorm(width), nn.Linear(width, dim), nn.GELU(), nn.Linear(dim, dim))
    raise XscaleInputError(f"adapter must be 'linear' or 'mlp'; got {kind!r}.")


# --------------------------------------------------------------------------- table


@register_gene_embedder("table")
class TableGeneEmbedder(GeneEmbedder):
    """Gene vectors read from a file, with learned fallbacks and a trainable adapter.

    Parameters
    ----------
    n_genes, dim
        Vocabulary size and model width D.
    genes
        The model's vocabulary (n_genes symbols, vocabulary order).
    path
        Table file (see :func:`read_gene_table`); its width E may differ from D.
    freeze
        Keep the table rows fixed (the adapter and fallback rows still train).
    adapter
        ``"linear"`` (LayerNorm + Linear E -> D) or ``"mlp"``.

    Genes absent from the table get a learned row of width E (their number is logged).
    ``forward(gene_ids (B, G)) -> (B, G, D)``.
    """

    def __init__(
        self, n_genes: int, dim: int, genes: Sequence[str], *, path: str, freeze: bool = True,
        adapter: Adapter = "linear",
    ) -> None:
        super().__init__()
        if len(genes) != n_genes:
            raise ValueError(f"genes has {len(genes)} symbols but n_genes={n_genes}.")
        self.n_genes, self.dim = n_genes, dim
        saved = _saved_table(n_genes)
        if saved is not None and not Path(path).is_file():  # a saved model whose table file has moved
            log.warning("Gene table %s not found: the model's own copy of the table (saved with its weights) is "
                        "used; the file is needed only to build a new model.", path)
            table, fallback, rows = saved
            self.table = nn.Parameter(torch.zeros_like(table), requires_grad=not freeze)  # (n_found, E), loaded next
            self.fallback = nn.Parameter(torch.zeros_like(fallback))  # (n_missing, E)
            self.register_buffer("rows", rows.clone())
            self.n_missing = int(fallback.shape[0])
            self.adapter = _adapter(int(table.shape[1]), dim, adapter)
            return
        symbols, vectors = read_gene_table(path)
        lookup: dict[str, int] = {}
        for i, s in enumerate(symbols):
            lookup.setdefault(normalize_symbol(s), i)
        found = [lookup.get(normalize_symbol(g), -1) for g in genes]
        missing = [g for g, i in zip(genes, found, strict=True) if i < 0]
        if len(missing) == n_genes:
            raise XscaleInputError(
                f"None of the {n_genes} vocabulary genes is in the gene table {path} ({len(symbols)} symbols, "
                f"e.g. {symbols[:5]}); check that both use gene symbols."
            )
        if missing:
            log.info("Gene table %s: %d of %d genes missing, using learned fallback rows (e.g. %s)",
                     path, len(missing), n_genes, missing[:5])
        self.n_missing = len(missing)
        have = [i for i in found if i >= 0]
        table = torch.from_numpy(vectors[have])  # (n_found, E)
        self.table = nn.Parameter(table, requires_grad=not freeze)
        width = table.shape[1]
        self.fallback = nn.Parameter(torch.randn(len(missing), width) * float(table.std()))  # (n_missing, E)
        # Vocabulary gene -> row of cat(table, fallback).
        rows, k, m = [], 0, 0
        for i in found:
            if i >= 0:
                rows.append(k)
                k += 1
            else:
                rows.append(len(have) + m)
                m += 1
        # saved with the weights: a model reloaded after the table file changed keeps its own gene -> row map
        self.register_buffer("rows", torch.tensor(rows, dtype=torch.long))
        self.adapter = _adapter(width, dim, adapter)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        key = prefix + "rows"
        if key not in state_dict:  # saved before the map was part of the weights: the file's map, as then
            state_dict[key] = self.rows.clone()
        elif not torch.equal(state_dict[key], self.rows):
            log.warning("Gene table: the file maps genes to rows differently from when this model was saved "
                        "(it changed since); using the saved map, so each gene keeps its trained vector.")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def gene_vectors(self) -> Tensor:
        """Adapted vector of every vocabulary gene. (n_genes, D)."""
        raw = torch.cat([self.table, self.fallback])[self.rows]  # (n_genes, E)
        return self.adapter(raw)

    def forward(self, gene_ids: Tensor) -> Tensor:
        return nn.functional.embedding(gene_ids, self.gene_vectors())  # (B, G) -> (B, G, D)


def _saved_table(n_genes: int) -> tuple[Tensor, Tensor, Tensor] | None:
    """(table, fallback, rows) of the gene table in the weights :func:`~xscale.models.io.load_model` is loading,
    when there is exactly one whose map covers ``n_genes`` genes; else None."""
    from xscale.models.io import weights_being_loaded

    state = weights_being_loaded()
    if not state:
        return None
    prefixes = [k[: -len("table")] for k in state if k.endswith("gene_embedder.table")]
    if len(prefixes) != 1 or any(prefixes[0] + part not in state for part in ("fallback", "rows")):
        return None
    rows = state[prefixes[0] + "rows"]
    return (state[prefixes[0] + "table"], state[prefixes[0] + "fallback"], rows) if len(rows) == n_genes else None


# --------------------------------------------------------------------------- protein LM


@register_gene_embedder("protein-lm")
class ProteinLMGeneEmbedder(GeneEmbedder):
    """Gene tokens from an ESM-2 protein language model run on each gene's protein.

    Parameters
    ----------
    n_genes, dim, genes
        Vocabulary size, model width D and vocabulary symbols (n_genes).
    model_dir
        Local directory holding an ESM-2 model and tokenizer saved with
        ``save_pretrained`` (see the module docstring). Loaded with
        ``local_files_only=True``: nothing is downloaded.
    fasta
        Protein FASTA; genes are matched by ``GN=`` symbol or the header's first word.
    n_trainable_layers
        How many of the last transformer layers train with the cell model (0 = frozen,
        per-gene vectors cached). The final layer norm trains when this is > 0.
    missing_sequences
        ``"error"`` (default): every vocabulary gene needs a sequence. ``"learned"``:
        genes without one (e.g. blank/control probes) get a learned vector.
    max_residues
        Longer proteins are truncated to their first ``max_residues`` residues.
    chunk_size
        Proteins per language-model forward pass.
    adapter
        ``"linear"`` or ``"mlp"`` map from the PLM width E to D.

    ``forward(gene_ids (B, G)) -> (B, G, D)``; only the genes present in the batch run
    through the trainable layers.
    """

    def __init__(
        self,
        n_genes: int,
        dim: int,
        genes: Sequence[str],
        *,
        model_dir: str,
        fasta: str,
        n_trainable_layers: int = 0,
        missing_sequences: Literal["error", "learned"] = "error",
        max_residues: int = 1022,
        chunk_size: int = 16,
        adapter: Adapter = "linear",
    ) -> None:
        super().__init__()
        try:
            from transformers import EsmModel, EsmTokenizer
        except ImportError as err:  # pragma: no cover - depends on the install
            raise XscaleInputError(
                "The protein-lm gene embedder needs transformers: pip install 'xscale[plm]'."
            ) from err
        if len(genes) != n_genes:
            raise ValueError(f"genes has {len(genes)} symbols but n_genes={n_genes}.")
        if missing_sequences not in ("error", "learned"):
            raise XscaleInputError(f"missing_sequences must be 'error' or 'learned'; got {missing_sequences!r}.")
        self.n_genes, self.dim = n_genes, dim
        mdir = Path(model_dir)
        if not (mdir / "config.json").exists():
            raise XscaleInputError(
                f"model_dir {str(mdir)!r} holds no ESM-2 model (no config.json). Save one there with "
                "EsmModel.from_pretrained('facebook/esm2_t6_8M_UR50D').save_pretrained(DIR) and the same for "
                "EsmTokenizer, on a machine with internet access; see xscale.models.plm."
            )
        kind = json.loads((mdir / "config.json").read_text()).get("model_type")
        if kind != "esm":
            raise XscaleInputError(f"model_dir {str(mdir)!r}: expected an ESM-2 model (config.json model_type 'esm'), "
                                   f"found model_type {kind!r}. Pass the directory of an ESM-2 checkpoint.")
        if not (mdir / "vocab.txt").is_file():
            raise XscaleInputError(f"model_dir {str(mdir)!r}: expected the ESM tokenizer beside the model "
                                   "(vocab.txt), found none. Save it there too: "
                                   "EsmTokenizer.from_pretrained(NAME).save_pretrained(DIR).")
        self.plm = EsmModel.from_pretrained(str(mdir), local_files_only=True, add_pooling_layer=False)
        tokenizer = EsmTokenizer.from_pretrained(str(mdir), local_files_only=True)
        layers = self.plm.encoder.layer
        if not 0 <= n_trainable_layers <= len(layers):
            raise XscaleInputError(f"n_trainable_layers must be in [0, {len(layers)}] for this model; "
                                   f"got {n_trainable_layers}.")
        self.n_trainable_layers = n_trainable_layers
        self.plm.requires_grad_(False)
        if n_trainable_layers:
            for layer in layers[len(layers) - n_trainable_layers:]:
                layer.requires_grad_(True)
            if self.plm.encoder.emb_layer_norm_after is not None:
                self.plm.encoder.emb_layer_norm_after.requires_grad_(True)

        seqs = read_fasta(fasta)
        missing = [g for g in genes if normalize_symbol(g) not in seqs]
        if missing and missing_sequences == "error":
            raise XscaleInputError(
                f"{len(missing)} of {n_genes} vocabulary genes have no protein sequence in {fasta}: "
                f"{missing[:20]}{' ...' if len(missing) > 20 else ''}. Add their sequences to the FASTA "
                "(headers '>SYMBOL' or UniProt 'GN=SYMBOL'), or pass missing_sequences='learned' to give them "
                "learned vectors."
            )
        if missing:
            log.info("%d of %d genes have no protein sequence; using learned vectors (e.g. %s)", len(missing),
                     n_genes, missing[:5])
        has_seq = [normalize_symbol(g) in seqs for g in genes]
        protein_genes = [normalize_symbol(g) for g, h in zip(genes, has_seq, strict=True) if h]
        long = sum(len(seqs[g]) > max_residues for g in protein_genes)
        if long:
            log.info("%d proteins longer than %d residues are truncated", long, max_residues)
        enc = tokenizer([seqs[g][:max_residues] for g in protein_genes], padding=True, return_tensors="pt")
        # Tokens per protein; non-persistent: rebuilt from the FASTA, so saved models stay small.
        self.register_buffer("tokens", enc["input_ids"], persistent=False)  # (P, L)
        self.register_buffer("token_mask", enc["attention_mask"], persistent=False)  # (P, L)
        # Vocabulary gene -> protein row (P rows) or fallback row (P + j).
        rows, p, m = [], 0, 0
        for h in has_seq:
            rows.append(p if h else len(protein_genes) + m)
            p, m = p + h, m + (not h)
        self.n_proteins = len(protein_genes)
        self.register_buffer("rows", torch.tensor(rows, dtype=torch.long), persistent=False)
        width = self.plm.config.hidden_size
        self.fallback = nn.Parameter(torch.randn(len(missing), width) * 0.02)  # (n_missing, E)
        self.adapter = _adapter(width, dim, adapter)
        self.chunk_size = chunk_size
        # (P, E) protein vectors: kept while the PLM is frozen, or during inference without gradients.
        self.register_buffer("cache", torch.empty(0), persistent=False)
        self.register_load_state_dict_post_hook(lambda module, _incompatible: module.clear_cache())

    @property
    def frozen(self) -> bool:
        return self.n_trainable_layers == 0

    def protein_vectors(self, proteins: Tensor) -> Tensor:
        """Mean-pooled residue embeddings of the given protein rows. (P',) -> (P', E).

        Special tokens (<cls>, <eos>) and padding are excluded from the mean.
        """
        out = []
        for chunk in proteins.split(self.chunk_size):
            mask = self.token_mask[chunk]  # (p, L)
            length = int(mask.sum(1).max())
            ids, mask = self.tokens[chunk, :length], mask[:, :length]
            hidden = self.plm(input_ids=ids, attention_mask=mask).last_hidden_state  # (p, L, E)
            residue = mask.clone()
            residue[:, 0] = 0  # <cls>
            residue[torch.arange(len(chunk), device=ids.device), mask.sum(1) - 1] = 0  # <eos>
            w = residue.unsqueeze(-1).to(hidden.dtype)
            out.append((hidden * w).sum(1) / w.sum(1).clamp_min(1.0))  # (p, E)
        return torch.cat(out)

    def clear_cache(self) -> None:
        """Forget cached protein vectors (done on loading weights and when trainable layers train)."""
        self.cache = torch.empty(0, device=self.tokens.device)

    def train(self, mode: bool = True) -> ProteinLMGeneEmbedder:
        if mode and not self.frozen:
            self.clear_cache()  # the trainable layers are about to change
        return super().train(mode)

    def cached_protein_vectors(self) -> Tensor:
        """All proteins' vectors, computed once without gradients and kept. (P, E)."""
        if self.cache.shape[0] != self.n_proteins or self.cache.device != self.tokens.device:
            log.info("Computing protein-LM embeddings of %d proteins (cached)", self.n_proteins)
            was_training = self.plm.training
            self.plm.eval()
            with torch.no_grad():
                self.cache = self.protein_vectors(torch.arange(self.n_proteins, device=self.tokens.device))
            self.plm.train(was_training)
        return self.cache

    def forward(self, gene_ids: Tensor) -> Tensor:
        if self.frozen or (not torch.is_grad_enabled() and not self.training):
            raw = torch.cat([self.cached_protein_vectors(), self.fallback])[self.rows]  # (n_genes, E)
            return nn.functional.embedding(gene_ids, self.adapter(raw))  # (B, G) -> (B, G, D)
        uniq, inverse = torch.unique(gene_ids, return_inverse=True)  # (U,), (B, G)
        rows = self.rows[uniq]
        is_protein = rows < self.n_proteins
        raw = self.fallback.new_zeros(len(uniq), self.fallback.shape[1])  # (U, E)
        if is_protein.any():
            raw = raw.index_copy(0, is_protein.nonzero().squeeze(1), self.protein_vectors(rows[is_protein]))
        if (~is_protein).any():
            fb = self.fallback[rows[~is_protein] - self.n_proteins]
            raw = raw.index_copy(0, (~is_protein).nonzero().squeeze(1), fb)
        return self.adapter(raw)[inverse]  # (U, D) -> (B, G, D)
