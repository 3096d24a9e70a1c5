"""What ``raydiff evaluate`` keeps of its stream of feature rows: bounded, whatever the count.

Feature rows reach the evaluating process in batches, in no fixed order (from Ray Data actors,
or from a cache file). Nothing here keeps all of them:

- FID: float64 count, sum and sum of outer products (``metrics.FeatureStats``) per cell (see
  below), merged into the statistics of any reported set: FID always uses every image. Per
  class only where both sides' per-class statistics fit ``PER_CLASS_STATS_MAX_BYTES``.
- KID, precision/recall, copy rate and diversity: a seeded subset of at most ``size`` rows per
  set and side (``SeededSubset``), the rows whose key has the smallest priority
  (``subset_priority``, a hash of seed and key). Which rows those are depends on the keys and
  the seed only, never on how the rows were batched, ordered or spread over actors.
- Inception Score: per set and split, the sums of torch-fidelity's ``isc_features_to_metric``
  with its own shuffled assignment of rows to splits (``SplitScore``, one byte per image).
- A classifier's top-1: correct and total counts per class.

Cells: each evaluated class belongs to one (head/body/tail third, many/medium/few-shot group)
cell, at most five of which are non-empty (both cut the same ranking by training count). Every
reported set (overall, a third, a shot group) is a union of cells, and the ``size`` rows of
smallest priority of a union are among those of its cells, so a ``SeededSubset`` per cell gives
every set's subset: at most 5 x ``size`` rows per side.

No Ray here: ``raydiff.distributed.evaluate`` feeds these from its Ray Data pass and its cache.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from raydiff import metrics as metrics_lib
from raydiff.errors import RaydiffError
from raydiff.metrics import GROUPS, RNG_SEED, SHOT_GROUPS, FeatureStats

METRIC_SUBSET = 10_000  # default rows per set and side for KID, P/R, copy rate and diversity
# Per-class FID keeps float64 statistics per class only while both sides' fit in this (10
# classes of 2048-d Inception features take 0.7 GB; 1000 would take 67 GB); otherwise each
# class's FID comes from its rows in the metric subsets.
PER_CLASS_STATS_MAX_BYTES = 1 << 30

# SplitMix64 (Steele, Lea & Flood 2014, "Fast splittable pseudorandom number generators")
_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX_1, _MIX_2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def subset_priority(keys, seed: int) -> np.ndarray:
    """Each key's priority: output number ``key`` (from 0) of a SplitMix64 generator seeded
    with ``seed``, a uint64 that looks uniform and depends on (seed, key) only."""
    keys = np.asarray(keys, np.int64)
    if (keys < 0).any():
        raise ValueError("subset keys must be non-negative")
    z = np.uint64(seed % 2 ** 64) + (keys.astype(np.uint64) + np.uint64(1)) * _GAMMA
    z = (z ^ (z >> np.uint64(30))) * _MIX_1
    z = (z ^ (z >> np.uint64(27))) * _MIX_2
    return z ^ (z >> np.uint64(31))


@dataclass
class Rows:
    """Feature rows (float32) with their keys (unique) and labels."""

    keys: np.ndarray
    labels: np.ndarray
    rows: np.ndarray

    def __len__(self) -> int:
        return len(self.keys)

    def take(self, index) -> Rows:
        return Rows(self.keys[index], self.labels[index], self.rows[index])

    @classmethod
    def empty(cls, dim: int) -> Rows:
        return cls(np.empty(0, np.int64), np.empty(0, np.int64), np.empty((0, dim), np.float32))


class SeededSubset:
    """The (at most) ``size`` rows of a stream with the smallest (priority, key), priority =
    ``subset_priority(key, seed)``. Its buffers grow to ``size`` rows and no further; once
    full, a batch costs one comparison per row unless some row beats the worst kept one."""

    def __init__(self, size: int, dim: int, seed: int):
        if size < 1:
            raise ValueError(f"subset size must be at least 1, got {size}")
        self.size, self.seed, self.count = size, seed, 0
        self.prio = np.empty(0, np.uint64)
        self.buf = Rows.empty(dim)
        self._worst: tuple[np.uint64, int] | None = None

    def __len__(self) -> int:
        return self.count

    @property
    def kept(self) -> Rows:
        return self.buf.take(slice(0, self.count))

    @property
    def priorities(self) -> np.ndarray:
        return self.prio[:self.count]

    def _grow(self, need: int) -> None:
        capacity = len(self.prio)
        if need <= capacity:
            return
        capacity = min(self.size, max(need, 2 * capacity, 64))
        grown = Rows(np.empty(capacity, np.int64), np.empty(capacity, np.int64),
                     np.empty((capacity, self.buf.rows.shape[1]), np.float32))
        prio = np.empty(capacity, np.uint64)
        for old, new in ((self.buf.keys, grown.keys), (self.buf.labels, grown.labels),
                         (self.buf.rows, grown.rows), (self.prio, prio)):
            new[:self.count] = old[:self.count]
        self.buf, self.prio = grown, prio

    def _write(self, slots, new: Rows, prio: np.ndarray) -> None:
        self.buf.keys[slots], self.buf.labels[slots] = new.keys, new.labels
        self.buf.rows[slots], self.prio[slots] = new.rows, prio

    def offer(self, keys, labels, rows) -> None:
        new = Rows(np.asarray(keys, np.int64), np.asarray(labels, np.int64),
                   np.asarray(rows, np.float32))
        prio = subset_priority(new.keys, self.seed)
        if self._worst is not None:  # full: only rows that beat the worst kept one enter
            worst_prio, worst_key = self._worst
            beats = (prio < worst_prio) | ((prio == worst_prio) & (new.keys < worst_key))
            new, prio = new.take(beats), prio[beats]
        if not len(new):
            return
        n = self.count
        if n + len(new) <= self.size:
            self._grow(n + len(new))
            self._write(slice(n, n + len(new)), new, prio)
            self.count = n + len(new)
        else:
            order = np.lexsort((np.concatenate([self.buf.keys[:n], new.keys]),
                                np.concatenate([self.prio[:n], prio])))[:self.size]
            self._grow(self.size)
            entering = order[order >= n] - n
            # the slots of the kept rows that lost their place, and any never filled
            slots = np.setdiff1d(np.arange(self.size), order[order < n])
            self._write(slots, new.take(entering), prio[entering])
            self.count = self.size
        if self.count == self.size:
            prio_kept = self.prio[:self.count]
            top = prio_kept.max()
            self._worst = (top, int(self.buf.keys[:self.count][prio_kept == top].max()))


def smallest(parts: Sequence[SeededSubset], size: int, label: int | None = None) -> Rows:
    """The ``size`` rows of smallest (priority, key) among the kept rows of ``parts`` (only
    those of class ``label``, with one), in key order."""
    kept, prio = [p.kept for p in parts], [p.priorities for p in parts]
    if label is not None:
        mine = [k.labels == label for k in kept]
        kept, prio = [k.take(m) for k, m in zip(kept, mine)], [q[m] for q, m in zip(prio, mine)]
    chosen = np.lexsort((np.concatenate([k.keys for k in kept]), np.concatenate(prio)))[:size]
    bounds = np.cumsum([0] + [len(k) for k in kept])
    pieces = [k.take(chosen[(chosen >= lo) & (chosen < hi)] - lo)
              for k, lo, hi in zip(kept, bounds[:-1], bounds[1:])]
    merged = Rows(*(np.concatenate([getattr(p, f) for p in pieces])
                    for f in ("keys", "labels", "rows")))
    return merged.take(np.argsort(merged.keys, kind="stable"))


# --- sets and cells -----------------------------------------------------------------------------

def eval_sets(classes: Sequence[int], groups: np.ndarray, shots: np.ndarray,
              with_groups: bool) -> dict[str, list[int]]:
    """The sets of classes reported: overall, and with ``with_groups`` each head/body/tail
    third and each many/medium/few-shot group that has classes."""
    sets = {"overall": [int(c) for c in classes]}
    if with_groups:
        sets.update({name: [int(c) for c in classes if groups[c] == g]
                     for g, name in enumerate(GROUPS)})
        sets.update({name: [int(c) for c in classes if shots[c] == g]
                     for g, name in enumerate(SHOT_GROUPS)})
    return {name: members for name, members in sets.items() if members}


def class_cells(num_classes: int, classes: Sequence[int], groups: np.ndarray,
                shots: np.ndarray) -> np.ndarray:
    """Cell index per class (0, 1, ... over the non-empty (third, shot group) pairs); -1 for
    a class that is not evaluated."""
    cell_ids = np.full(num_classes, -1, np.int64)
    pairs = sorted({(int(groups[c]), int(shots[c])) for c in classes})
    for c in classes:
        cell_ids[c] = pairs.index((int(groups[c]), int(shots[c])))
    return cell_ids


def per_class_stats_fit(num_classes: int, dim: int) -> bool:
    """Whether float64 statistics of every class, for both sides, fit the budget."""
    return 2 * num_classes * (dim * dim + dim) * 8 <= PER_CLASS_STATS_MAX_BYTES


class FeatureStream:
    """One side of the comparison (the generated images, or the reference split): per cell
    its float64 statistics and a seeded subset of ``subset_size`` rows; per class its
    statistics too with ``per_class_stats``. Rows of classes outside the cells are ignored."""

    def __init__(self, cells: np.ndarray, dim: int, subset_size: int, seed: int,
                 per_class_stats: bool = False):
        self.cells, self.dim, self.subset_size = np.asarray(cells, np.int64), dim, subset_size
        n_cells = int(self.cells.max()) + 1
        self.stats = [FeatureStats(dim) for _ in range(n_cells)]
        self.subsets = [SeededSubset(subset_size, dim, seed) for _ in range(n_cells)]
        self.class_stats = ({int(c): FeatureStats(dim) for c in np.flatnonzero(self.cells >= 0)}
                            if per_class_stats else None)

    def add(self, keys, labels, rows) -> None:
        keys, labels = np.asarray(keys, np.int64), np.asarray(labels, np.int64)
        rows = np.asarray(rows)
        cell = self.cells[labels]
        for c in np.unique(cell[cell >= 0]):
            take = cell == c
            self.stats[c].update(rows[take])
            self.subsets[c].offer(keys[take], labels[take], rows[take])
        if self.class_stats is not None:
            for label in np.unique(labels[cell >= 0]):
                self.class_stats[int(label)].update(rows[labels == label])

    def _cells_of(self, classes: Sequence[int]) -> list[int]:
        cells = sorted({int(self.cells[c]) for c in classes})
        if -1 in cells or set(np.flatnonzero(np.isin(self.cells, cells)).tolist()) != set(classes):
            raise ValueError(f"classes {list(classes)} are not a union of evaluation cells")
        return cells

    def stats_of(self, classes: Sequence[int]) -> FeatureStats:
        cells = self._cells_of(classes)
        stats = self.stats[cells[0]]
        for c in cells[1:]:
            stats = stats.merge(self.stats[c])
        return stats

    def subset_of(self, classes: Sequence[int]) -> Rows:
        """The set's seeded subset: its ``subset_size`` rows of smallest priority, key order."""
        return smallest([self.subsets[c] for c in self._cells_of(classes)], self.subset_size)

    def class_rows(self, label: int, limit: int | None = None) -> Rows:
        """The rows of one class in its cell's subset (the ``limit`` of smallest priority)."""
        cell = int(self.cells[label])
        return smallest([self.subsets[cell]], limit or self.subset_size, label=label)

    def subset_rows(self) -> Rows:
        """Every row of every cell's subset (each row is in one cell), key order."""
        return smallest(self.subsets, sum(len(s) for s in self.subsets))


class SplitScore:
    """Inception Score of one set from streamed logits, exactly as torch-fidelity's
    ``isc_features_to_metric(shuffle=True)``: the set's rows in key order are permuted with
    ``np.random.RandomState(seed).permutation(n)`` and cut into ``splits`` consecutive splits;
    each split scores exp(mean_x KL(p(y|x) || p(y))) with p(y) its mean of p(y|x). Per split
    only sum_x p(y|x), sum_x sum_y p log p and the count are kept, plus one byte per row of
    the set: its split."""

    def __init__(self, n: int, logits_dim: int, splits: int = metrics_lib.ISC_SPLITS,
                 seed: int = RNG_SEED):
        self.n, self.splits = n, min(splits, n)
        perm = np.random.RandomState(seed).permutation(n)
        self.split_of = np.empty(n, np.uint8 if self.splits < 256 else np.int64)
        for i in range(self.splits):  # shuffled positions i*n//splits .. (i+1)*n//splits - 1
            self.split_of[perm[i * n // self.splits:(i + 1) * n // self.splits]] = i
        self.p_sum = np.zeros((self.splits, logits_dim))
        self.p_log_p = np.zeros(self.splits)
        self.count = np.zeros(self.splits, np.int64)

    def update(self, positions: np.ndarray, p: np.ndarray, p_log_p: np.ndarray) -> None:
        """Rows at ``positions`` (0-based, key order within the set): their softmax ``p`` and
        their sum_y p log p."""
        split = self.split_of[positions]
        for s in np.unique(split):
            mine = split == s
            self.p_sum[s] += p[mine].sum(axis=0)
            self.p_log_p[s] += p_log_p[mine].sum()
            self.count[s] += int(mine.sum())

    def result(self) -> dict[str, float]:
        if self.splits < 1:
            return {"isc_mean": float("nan"), "isc_std": float("nan")}
        if self.count.sum() != self.n:
            raise RuntimeError(f"Inception Score over {self.count.sum()} of {self.n} images")
        q = self.p_sum / self.count[:, None]
        q_log_q = np.where(q > 0, q * np.log(np.where(q > 0, q, 1.0)), 0.0).sum(axis=1)
        scores = np.exp(self.p_log_p / self.count - q_log_q)
        return {"isc_mean": float(np.mean(scores)), "isc_std": float(np.std(scores))}


def softmax_terms(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 softmax of each row and its sum_y p log p (log-softmax, as torch-fidelity)."""
    x = np.asarray(logits, np.float64)
    shifted = x - x.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    p = np.exp(log_p)
    return p, (p * log_p).sum(axis=1)


class GeneratedStream:
    """The generated side: a ``FeatureStream``, the Inception Score of each reported set
    (with ``logits_dim``) and the classifier's correct/total per class (with ``top1``).

    Image i of a sample folder has label ``layout[i % len(layout)]`` (``raydiff sample``'s
    labels rule), which gives each image's position within every set in key order, as the IS
    splits need; a row that breaks the rule is refused."""

    def __init__(self, features: FeatureStream, layout: Sequence[int], per_class: int,
                 sets: dict[str, list[int]], logits_dim: int | None = None,
                 top1: bool = False):
        self.features = features
        self.layout = np.asarray(layout, np.int64)
        num_classes = len(features.cells)
        self.slots: dict[str, tuple[np.ndarray, np.ndarray, int]] = {}
        self.scores: dict[str, SplitScore] = {}
        if logits_dim is not None:
            for name, members in sets.items():
                member = np.isin(self.layout, members)
                prefix = np.concatenate([[0], np.cumsum(member)[:-1]])
                self.slots[name] = (member, prefix, int(member.sum()))
                self.scores[name] = SplitScore(per_class * int(member.sum()), logits_dim)
        self.correct = np.zeros(num_classes, np.int64) if top1 else None
        self.total = np.zeros(num_classes, np.int64) if top1 else None

    def add(self, keys, labels, rows, logits=None) -> None:
        keys, labels = np.asarray(keys, np.int64), np.asarray(labels, np.int64)
        slot = keys % len(self.layout)
        wrong = np.flatnonzero(self.layout[slot] != labels)
        if len(wrong):
            i = wrong[0]
            raise RaydiffError(f"generated image {keys[i]} has label {labels[i]}, but the sample "
                               f"folder's labels rule gives {self.layout[slot[i]]}")
        self.features.add(keys, labels, rows)
        if self.scores:
            p, p_log_p = softmax_terms(logits)
            for name, (member, prefix, per_cycle) in self.slots.items():
                mine = member[slot]
                positions = (keys[mine] // len(self.layout)) * per_cycle + prefix[slot[mine]]
                self.scores[name].update(positions, p[mine], p_log_p[mine])
        if self.correct is not None:
            hit = np.asarray(logits).argmax(axis=1) == labels
            self.correct += np.bincount(labels[hit], minlength=len(self.correct))
            self.total += np.bincount(labels, minlength=len(self.total))


# --- metrics from the streams -------------------------------------------------------------------

def nearest_by_class(queries: Rows, chunks: Iterable[Rows]) -> np.ndarray:
    """Per query row, the distance to its nearest row of the same class over all ``chunks``
    (inf where the class has none)."""
    best = np.full(len(queries), np.inf)
    by_class = {int(c): np.flatnonzero(queries.labels == c) for c in np.unique(queries.labels)}
    for chunk in chunks:
        for c in np.unique(chunk.labels):
            mine = by_class.get(int(c))
            if mine is not None:
                near = metrics_lib.nearest_distance(queries.rows[mine],
                                                    chunk.rows[chunk.labels == c])
                best[mine] = np.minimum(best[mine], near)
    return best


def copy_ratios(queries: Rows, train: Iterable[Rows], reference: Iterable[Rows]) -> np.ndarray:
    """``metrics.copy_ratios`` with the training and reference rows read a chunk at a time."""
    d_train, d_ref = nearest_by_class(queries, train), nearest_by_class(queries, reference)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = d_train / d_ref
    ratios[np.isinf(d_train) | np.isinf(d_ref)] = np.nan
    return ratios


@dataclass
class CopyRatios:
    """Copy ratios of the generated subset rows, by key."""

    keys: np.ndarray  # sorted
    ratios: np.ndarray

    def of(self, keys: np.ndarray) -> np.ndarray:
        return self.ratios[np.searchsorted(self.keys, keys)]


def class_diversity(gen: FeatureStream, ref: FeatureStream,
                    classes: Sequence[int]) -> dict[int, float]:
    """``metrics.class_diversity`` from each class's rows in the subsets (the
    ``DIVERSITY_MAX_ROWS`` of smallest priority)."""
    limit = metrics_lib.DIVERSITY_MAX_ROWS
    return {int(c): metrics_lib.mean_pairwise_distance(gen.class_rows(c, limit).rows)
            / metrics_lib.mean_pairwise_distance(ref.class_rows(c, limit).rows) for c in classes}


def set_results(metrics: Sequence[str], gen: GeneratedStream, ref: FeatureStream, name: str,
                members: list[int], copies: CopyRatios | None = None,
                diversity: dict[int, float] | None = None) -> dict:
    """Every requested metric of one set: FID from all images, KID and P/R from the seeded
    subsets, IS from all images, copy rate from the generated subset, diversity from the
    classes' rows in the subsets, the classifier's top-1 from all images."""
    g, r = gen.features.subset_of(members), ref.subset_of(members)
    out = metrics_lib.set_metrics(metrics, gen.features.stats_of(members), ref.stats_of(members),
                                  g.rows, r.rows, max_images=gen.features.subset_size)
    if "kid" in metrics or "prc" in metrics:
        out.update(subset_generated=len(g), subset_reference=len(r))
    if "isc" in metrics and name in gen.scores:
        out.update(gen.scores[name].result())
    out["classes"] = members
    if copies is not None:
        out["copy_rate"] = metrics_lib.copy_rate(copies.of(g.keys))
    if diversity is not None:
        out["diversity"] = metrics_lib.mean_diversity([diversity[c] for c in members])
    if gen.correct is not None:
        total = int(gen.total[members].sum())
        out["classifier_top1"] = float(gen.correct[members].sum() / total) if total else None
    return out


def per_class_fid(gen: FeatureStream, ref: FeatureStream,
                  classes: Sequence[int]) -> dict[int, float]:
    """FID of each class against its reference images: from its float64 statistics where the
    streams keep them, else from its rows in the subsets."""
    out = {}
    for c in classes:
        g, r = gen.class_rows(c), ref.class_rows(c)
        if gen.class_stats is not None and ref.class_stats is not None:
            gen_stats, ref_stats = gen.class_stats[c], ref.class_stats[c]
        else:
            gen_stats, ref_stats = FeatureStats.of(g.rows), FeatureStats.of(r.rows)
        out[int(c)] = metrics_lib.fid_of(gen_stats, ref_stats, g.rows, r.rows)
    return out
