"""Reference (null-model) graphs for the connectome, and the sparse-adjacency helpers it shares.

Null models are made once per graph and seed (NullModelCache) and shared by σ, ω, rich club and Q:
  random   Maslov & Sneppen 2002 double-edge swaps, `swaps` attempts per edge; degrees are kept,
           connectivity is not enforced (path lengths are taken on the largest component)
  lattice  the same degree sequence laid on a ring in a seeded order, each node joined to its nearest
           free neighbours. Sporns & Zwi's latticization (networkx's lattice_reference) heads for the
           same kind of graph by swaps, but converges slowly: on a random graph of 2,000 nodes and
           100,000 edges, 10 swap attempts per edge reach transitivity 0.12; the ring lattice has 0.74.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import networkx as nx
import numpy as np
import scipy.sparse as sp

from ..errors import MlxscanError

__all__ = ["NullModelCache", "random_reference", "lattice_reference"]

NULL_FORMAT = 1  # part of every cached reference's key: bump when the generators change


# ---------------------------------------------------------------- graphs as sparse matrices


def _adjacency(adjacency) -> sp.csr_array:
    """Validated [n, n] float64 CSR: square, symmetric, 0/1, no self-loops."""
    if isinstance(adjacency, nx.Graph):
        adjacency = nx.to_scipy_sparse_array(adjacency, nodelist=list(adjacency), weight=None)
    A = sp.csr_array(adjacency, dtype=np.float64)
    if A.ndim != 2 or A.shape[0] != A.shape[1]:
        raise MlxscanError(f"an adjacency matrix must be square [n, n]; got shape {A.shape}")
    A.eliminate_zeros()
    if A.diagonal().any() or (A.data != 1).any() or (A != A.T).nnz:
        raise MlxscanError("the adjacency must be symmetric 0/1 without self-loops (an undirected simple graph)")
    return A


def _edges(A: sp.csr_array) -> np.ndarray:
    """[m, 2] each edge once as (i, j) with i < j, in row-major order."""
    upper = sp.triu(A, k=1, format="coo")
    order = np.lexsort((upper.col, upper.row))
    return np.stack([upper.row[order], upper.col[order]], axis=1).astype(np.int64)


def _from_edges(edges: np.ndarray, n: int) -> sp.csr_array:
    edges = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    rows = np.concatenate([edges[:, 0], edges[:, 1]])
    cols = np.concatenate([edges[:, 1], edges[:, 0]])
    return sp.csr_array((np.ones(len(rows)), (rows, cols)), shape=(n, n))


# ---------------------------------------------------------------- reference graphs


def random_reference(adjacency, *, swaps: int = 10, seed=0) -> sp.csr_array:
    """Degree-preserving randomization: `swaps` × m double-edge swap attempts, seeded.

    Each attempt takes two edges (a, b), (c, d) and rewires them to (a, d), (c, b), unless that would
    make a self-loop or a second edge between two nodes.
    """
    A = _adjacency(adjacency)
    n, edges = A.shape[0], _edges(A)
    if len(edges) < 2:
        raise MlxscanError("a random reference needs a graph with at least 2 edges")
    rng = np.random.default_rng(seed)
    heads, tails = edges[:, 0].tolist(), edges[:, 1].tolist()
    present = {a * n + b for a, b in zip(heads, tails)}  # key of edge {a, b}: min * n + max
    attempts = swaps * len(edges)
    # Python loop on purpose: every swap depends on the ones before it. ~4 µs an attempt.
    for i, j, flip in zip(*(rng.integers(0, len(edges), attempts).tolist() for _ in range(2)),
                          rng.integers(0, 2, attempts).tolist()):
        a, b = heads[i], tails[i]
        c, d = (heads[j], tails[j]) if flip else (tails[j], heads[j])
        if a == c or a == d or b == c or b == d:
            continue
        new_ad = a * n + d if a < d else d * n + a
        new_cb = c * n + b if c < b else b * n + c
        if new_ad in present or new_cb in present:
            continue
        present.remove(a * n + b if a < b else b * n + a)
        present.remove(c * n + d if c < d else d * n + c)
        present.add(new_ad)
        present.add(new_cb)
        heads[i], tails[i], heads[j], tails[j] = a, d, c, b
    return _from_edges(np.stack([heads, tails], axis=1), n)


def lattice_reference(adjacency, *, seed=0) -> sp.csr_array:
    """The graph's degree sequence on a ring: nodes in a seeded random order, each pair joined in order of
    ring distance while both still lack edges. For a regular degree this is the ring lattice itself.
    """
    A = _adjacency(adjacency)
    n = A.shape[0]
    degree = np.asarray(A.sum(axis=1)).ravel().astype(np.int64)
    ring = np.random.default_rng(seed).permutation(n)  # ring[p]: the node at position p
    missing = degree[ring].tolist()  # by position
    linked: list[set[int]] = [set() for _ in range(n)]  # by position
    for step in range(1, n // 2 + 1):
        if not any(missing):
            break
        for p in [p for p in range(n) if missing[p]]:
            q = (p + step) % n
            if missing[p] and missing[q] and not (2 * step == n and p >= step):  # opposite pairs once
                _link(linked, missing, p, q)
    _place_leftovers(linked, missing)
    edges = np.array([(p, q) for p in range(n) for q in linked[p] if p < q], dtype=np.int64)
    return _from_edges(ring[edges], n)


def _link(linked: list[set[int]], missing: list[int], p: int, q: int) -> None:
    linked[p].add(q)
    linked[q].add(p)
    missing[p] -= 1
    missing[q] -= 1


def _place_leftovers(linked: list[set[int]], missing: list[int]) -> None:
    """Stubs no free partner could take (their candidates are all neighbours already): break an edge
    (p, q) nearest to them whose ends are strangers to them, and join x–p, y–q; every degree is kept."""
    n = len(linked)
    while any(missing):
        short = [p for p in range(n) if missing[p]]
        x = short[0]
        y = short[1] if len(short) > 1 else x  # the stubs add up to an even number: x has two left
        # Lazily, nearest first: one of the first few candidates nearly always does.
        near_x = ((x + sign * step) % n for step in range(1, n // 2 + 1) for sign in (1, -1))
        found = next(((p, q) for p in near_x if p not in (x, y) and p not in linked[x]
                      for q in linked[p] if q not in (x, y) and q not in linked[y]), None)
        if found is None:
            raise MlxscanError("cannot lay this degree sequence on a ring; the graph is too dense for a lattice")
        p, q = found
        linked[p].discard(q)
        linked[q].discard(p)
        missing[p] += 1
        missing[q] += 1
        _link(linked, missing, x, p)
        _link(linked, missing, y, q)


class NullModelCache:
    """Reference graphs made once: kept in memory, and under `folder` (when given) across runs.

    The key is the graph's edges, the kind of reference, its seed and swap count, so a reference is
    reused only for the very graph it was made from.
    """

    def __init__(self, folder: Path | None = None):
        self.folder = Path(folder) if folder is not None else None
        self._graphs: dict[str, np.ndarray] = {}
        self.made = 0  # references generated by this cache (the rest came from memory or disk)

    def get(self, kind: str, adjacency, *, seed: tuple[int, ...], swaps: int = 0) -> sp.csr_array:
        A = _adjacency(adjacency)
        edges = _edges(A)
        digest = hashlib.sha256(f"{NULL_FORMAT}:{kind}:{A.shape[0]}:{swaps}:{seed}:".encode())
        digest.update(edges.astype(np.int64).tobytes())
        key = digest.hexdigest()[:40]
        if key not in self._graphs:
            self._graphs[key] = self._load(key) if self._on_disk(key) else self._make(key, kind, A, seed, swaps)
        return _from_edges(self._graphs[key], A.shape[0])

    def _on_disk(self, key: str) -> bool:
        return self.folder is not None and (self.folder / f"{key}.npy").exists()

    def _load(self, key: str) -> np.ndarray:
        return np.load(self.folder / f"{key}.npy").astype(np.int64)

    def _make(self, key: str, kind: str, A, seed, swaps) -> np.ndarray:
        if kind == "random":
            reference = random_reference(A, swaps=swaps, seed=list(seed))
        elif kind == "lattice":
            reference = lattice_reference(A, seed=list(seed))
        else:
            raise MlxscanError(f"unknown reference kind {kind!r}; use random or lattice")
        self.made += 1
        edges = _edges(reference)
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=self.folder, prefix=f".{key}.", suffix=".npy")
            with os.fdopen(handle, "wb") as stream:
                np.save(stream, edges.astype(np.uint16 if A.shape[0] <= 1 << 16 else np.int64))
            os.replace(temporary, self.folder / f"{key}.npy")  # whole or absent, even with two runs at once
        return edges
