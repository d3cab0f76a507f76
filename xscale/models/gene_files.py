"""Files that give genes their external tokens: per-gene vector tables and protein FASTAs.

- :func:`read_gene_table` / :func:`save_gene_table`: one vector per gene symbol, as ``.npz``,
  ``.tsv`` or ``.safetensors`` (read by :class:`~xscale.models.plm.TableGeneEmbedder`).
- :func:`read_fasta`: protein sequences by gene symbol (read by
  :class:`~xscale.models.plm.ProteinLMGeneEmbedder`).

Nothing here unpickles: object arrays in an ``.npz`` are an error that says how to save strings.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from xscale.data.vocab import normalize_symbol
from xscale.errors import XscaleInputError


def read_gene_table(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """Read a gene -> vector table. Returns (symbols (n,), vectors (n, E) float32).

    Formats (chosen by suffix; nothing is unpickled):

    - ``.npz``: arrays ``genes`` (n,) of strings and ``embeddings`` (n, E).
    - ``.tsv`` / ``.txt``: one gene per line, ``SYMBOL<TAB>v1<TAB>v2 ...``; a header line
      (second field not a number) is skipped.
    - ``.safetensors``: either a tensor ``embeddings`` (n, E) with metadata ``genes``
      (a JSON list of symbols), or one 1-D tensor per gene named by its symbol.
    """
    path = Path(path)
    if not path.exists():
        raise XscaleInputError(f"Gene table {str(path)!r} does not exist. "
                               "Pass path= to an existing .npz/.tsv/.safetensors file.")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            if "genes" not in data or "embeddings" not in data:
                raise XscaleInputError(
                    f"Gene table {path} must hold arrays 'genes' and 'embeddings'; found {sorted(data.files)}."
                )
            try:
                symbols = [str(s) for s in data["genes"]]
            except ValueError as err:  # an object array (e.g. adata.var_names.values): needs pickle to read
                raise XscaleInputError(
                    f"Gene table {path}: 'genes' is an object array, which cannot be read without pickle (never "
                    "done here). Save it as strings: np.savez(PATH, genes=np.asarray(genes, dtype=str), "
                    "embeddings=...) or xscale.models.plm.save_gene_table."
                ) from err
            vectors = np.asarray(data["embeddings"], dtype=np.float32)
    elif suffix in (".tsv", ".txt"):
        symbols, rows = [], []
        for n, line in enumerate(path.read_text().splitlines()):
            fields = line.rstrip("\n").split("\t")
            if not line.strip() or (n == 0 and not fields[0].strip()):  # blank, or pandas' header ('' + numbers)
                continue
            try:
                row = [float(x) for x in fields[1:]]
            except ValueError:
                if n == 0:
                    continue  # header
                raise XscaleInputError(f"{path}:{n + 1}: expected SYMBOL<TAB>numbers, found {line[:80]!r}.") from None
            symbols.append(fields[0])
            rows.append(row)
        widths = {len(r) for r in rows}
        if len(widths) != 1:
            raise XscaleInputError(f"Gene table {path}: rows have different widths {sorted(widths)}; "
                                   "expected one width.")
        vectors = np.asarray(rows, dtype=np.float32)
    elif suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="np") as f:
            keys, meta = list(f.keys()), f.metadata() or {}
            if "embeddings" in keys and "genes" in meta:
                symbols = [str(s) for s in json.loads(meta["genes"])]
                vectors = np.asarray(f.get_tensor("embeddings"), dtype=np.float32)
            else:
                symbols = keys
                per_gene = [np.asarray(f.get_tensor(k), dtype=np.float32).reshape(-1) for k in keys]
                widths = sorted({v.size for v in per_gene})
                if len(widths) > 1:
                    raise XscaleInputError(f"Gene table {path}: per-gene vectors have different widths {widths}; "
                                           "expected one width.")
                vectors = np.stack(per_gene)
    else:
        raise XscaleInputError(f"Gene table {path}: unknown suffix {suffix!r}; expected .npz, .tsv or .safetensors.")
    if vectors.ndim != 2 or vectors.shape[0] != len(symbols) or vectors.shape[0] == 0:
        raise XscaleInputError(
            f"Gene table {path}: expected (n_genes, width) vectors for {len(symbols)} genes, "
            f"found shape {vectors.shape}."
        )
    if not np.isfinite(vectors).all():
        raise XscaleInputError(f"Gene table {path} holds NaN or infinite values; fix the file.")
    return symbols, vectors


def save_gene_table(path: str | os.PathLike, genes: Sequence[str], vectors: np.ndarray) -> Path:
    """Write a table readable by :func:`read_gene_table` (.npz or .safetensors), atomically
    (:func:`~xscale.utils.atomic.atomic_write`: a failed write keeps the previous file, leaves no temporary)."""
    from xscale.utils.atomic import atomic_write

    path = Path(path)
    if path.suffix not in (".npz", ".safetensors"):
        raise XscaleInputError(f"save_gene_table writes .npz or .safetensors; got {path.suffix!r}.")
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    with atomic_write(path, "wb") as handle:
        if path.suffix == ".npz":
            np.savez(handle, genes=np.asarray(list(genes), dtype=str), embeddings=vectors)
        else:
            from safetensors.numpy import save

            handle.write(save({"embeddings": vectors}, metadata={"genes": json.dumps(list(genes))}))
    return path


def _fasta_text(path: Path) -> str:
    """The text of a FASTA file, gzip-compressed (``.gz``, as UniProt serves it) or not."""
    import gzip

    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip magic
        raw = gzip.decompress(raw)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise XscaleInputError(
            f"FASTA file {str(path)!r}: expected a text (or gzip-compressed) protein FASTA, found bytes that are "
            f"not UTF-8 text ({err.reason} at byte {err.start}). Pass the FASTA itself, e.g. "
            "uniprot_sprot.fasta or uniprot_sprot.fasta.gz.") from None


def read_fasta(path: str | os.PathLike) -> dict[str, str]:
    """Protein sequences by normalised gene symbol from a FASTA file.

    The symbol is ``GN=SYMBOL`` from a UniProt header, else the first word of the
    header. The first record of each symbol wins (UniProt lists canonical first). A
    gzip-compressed file (``.fasta.gz``) is read as well.
    """
    path = Path(path)
    if not path.is_file():
        found = "a directory" if path.is_dir() else "nothing"
        raise XscaleInputError(f"FASTA file {str(path)!r}: expected a protein FASTA file, found {found}. "
                               "Pass fasta= to a protein FASTA (e.g. from UniProt).")
    seqs: dict[str, str] = {}
    name: str | None = None
    chunks: list[str] = []

    def flush() -> None:
        sequence = "".join(chunks).replace("*", "").upper()
        if name is not None and name not in seqs and sequence:  # a record of only '*' has no sequence
            seqs[name] = sequence

    for line in _fasta_text(path).splitlines():
        line = line.strip()
        if line.startswith(">"):
            flush()
            header = line[1:]
            gn = [w[3:] for w in header.split() if w.startswith("GN=")]
            name = normalize_symbol(gn[0] if gn else header.split()[0] if header.split() else "")
            chunks = []
        elif line:
            chunks.append(line)
    flush()
    if not seqs:
        raise XscaleInputError(f"No sequences found in FASTA file {path}; "
                               "expected '>' header lines followed by sequence lines.")
    return seqs
