"""KV-Compress at run time: every KV head keeps its own calibrated number of tokens, in ragged compact storage.

Plan tensors (the exact semantics; ``Plan.check`` validates them):

- ``kvcompress.head_keep`` float32 ``[L, H_kv]``: each KV head's **share of its layer's budget**. Every entry is in
  ``[0, 1]`` and every row sums to 1 (within 1e-3). With the layer's keep fraction ``k_l`` (PyramidInfer's
  ``pyramidinfer.layer_keep[l]``, or ``kvcompress.layer_keep[l]`` in a plan without PyramidInfer), head ``h`` of
  layer ``l`` keeps the fraction ``f_lh = min(1, head_keep[l, h] * H_kv * k_l)`` of the real tokens it has seen:
  ``budget = min(seen, max(ceil(f_lh * seen), sink + window))``. A head with ``f_lh = 1`` keeps the whole context.
  Equal shares give every head the layer's budget; in a plan with PyramidInfer such a layer *is* a PyramidInfer
  layer (one token set for all its heads, PyramidInfer's scoring), so equal shares reproduce the PyramidInfer plan.
- ``kvcompress.layer_keep`` float32 ``[L]`` in ``(0, 1]``: the per-layer fractions of a plan that has KV-Compress
  without PyramidInfer (required there, refused next to ``pyramidinfer.layer_keep``).
- ``kvcompress.captured_curve`` float32 ``[L, H_kv, *]`` / ``kvcompress.captured_mass`` float32 ``[L, H_kv]``:
  calibration data for inspection (attention mass a head's future queries find when it keeps ``i / (n - 1)`` of
  the context), never read by the runtime.

Which tokens a head keeps (KV-Compress's metric, per request): after prefill the last ``window`` real queries score
every context token with their **squared** attention probabilities (``metric: l2``; ``l1``: plain), max-pooled
along the sequence (``pool``) per query head and summed over the query heads of the KV head's group (GQA); sinks
and the recent ``window`` tokens are always kept. While decoding every query's squared attention is added to the
scores (KV-Compress's continual metric), new tokens wait in a small dense tail and, every ``slack`` tokens, each
head keeps its best ``budget`` of what it holds (never fewer than the budget of the current length).

Storage (:class:`RaggedStorage`): per layer, **fixed-size blocks of ``block`` tokens, each owned by one (row, KV
head)**, packed one after the other with a block→(row, head) table — no full-length tensor, no mask, no padding of
heads to the widest one; a head holds ``ceil(kept / block)`` blocks. Attention over it is exact and vectorised:
per-block scores by one batched matmul, a segmented softmax (max and sum reduced per (row, head) with
``scatter_reduce`` / ``index_add``), per-block ``P @ V`` summed per (row, head). No loop over heads or tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicLayer

from .kcache import ValueStore, check_estimator, estimate, top_slots
from .layers import CompressingLayer, Held, LayerPlan, cat_rows, check_same, key_valid_from_mask, tensor_bytes
from . import pyramidinfer
from .pyramidinfer import query_block
from .schema import MethodSpec, ParamSpec, TensorContext, TensorSpec

NEG_INF = float("-inf")
POS_INF = float("inf")
SHARE_TOLERANCE = 1e-3  # rows of head_keep must sum to 1 within this


# ----------------------------------------------------------------------------------------------------------
# Budgets
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeadParams:
    """Per-layer KV-Compress settings taken from a plan.

    Attributes:
        fractions: per KV head, the fraction of the seen tokens it keeps (``f_lh``, in ``[0, 1]``; 1 keeps all).
        window: recent tokens every head keeps; also the number of last prefill queries that score the context.
        sink: first real tokens every head keeps.
        pool: max-pooling width of the prefill scores along the sequence (1 = none).
        metric: ``l2`` (squared attention, KV-Compress's default) or ``l1``.
        block: tokens per storage block.
        slack: decode tokens held in the dense tail before they are merged into the blocks (and heads over their
            budget evict).
    """

    fractions: tuple[float, ...]
    window: int
    sink: int
    pool: int
    metric: str
    block: int
    slack: int

    def budget(self, seen: torch.Tensor) -> torch.Tensor:
        """int64 ``[*seen.shape, H_kv]``: tokens each head keeps after ``seen`` real tokens (int64 tensor)."""
        frac = torch.tensor(self.fractions, dtype=torch.float64, device=seen.device)
        seen = seen.to(torch.int64)[..., None]
        # ceil, forgiving float32 rounding of the plan's shares (0.3f * 300 is 90.0000036, not 91 tokens)
        want = torch.ceil(seen.to(torch.float64) * frac - 1e-6).to(torch.int64)
        floor = torch.clamp(seen, max=self.sink + self.window)
        return torch.minimum(torch.maximum(want, floor), seen)

    def theoretical_tokens(self, seen: int) -> float:
        """Tokens held per KV head on average after ``seen`` real tokens (for memory accounting)."""
        if seen <= 0:
            return 0.0
        return float(self.budget(torch.tensor(seen)).double().mean())

    def make_layer(self, readers: int = 0, topn: int = 0, estimator: str = "residual_mean") -> "RaggedLayer":
        return RaggedLayer(self, readers=readers, topn=topn, estimator=estimator)


# ----------------------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------------------


def kvc_scores(
    query: torch.Tensor,
    keys: torch.Tensor,
    key_valid: torch.Tensor,
    scaling: float,
    window: int,
    pool: int = 1,
    metric: str = "l2",
) -> torch.Tensor:
    """KV-Compress's prefill metric: the squared attention of the last ``window`` queries, per KV head.

    Args:
        query: ``[B, H_q, Q, d]`` queries of the chunk just processed (post-RoPE); the last ``window`` vote.
        keys: ``[B, H_kv, T, d]``; the last ``Q`` of them belong to ``query``'s tokens.
        key_valid: bool ``[B, T]``, False for padding.
        scaling: softmax scale.
        window: number of last queries that vote.
        pool: max-pooling width along the sequence, applied per query head before the group sum (1 = none).
        metric: ``l2`` (sum of squared probabilities) or ``l1`` (sum of probabilities).

    Returns:
        float32 ``[B, H_kv, T]``: ``sum over the group's query heads of maxpool(sum over real window queries of
        p**2)``; padding keys get 0. Rows are independent (a padded row scores as it does alone); rows whose logits
        together exceed ``runtime.pyramidinfer.QUERY_BLOCK_BYTES`` are scored one at a time.
    """
    bsz, n_q_heads, q_len, dim = query.shape
    n_kv, total = keys.shape[1], keys.shape[2]
    w = min(window, q_len)
    if bsz > 1 and 4 * bsz * n_q_heads * w * total > pyramidinfer.QUERY_BLOCK_BYTES:  # one row at a time
        return torch.cat([kvc_scores(query[i : i + 1], keys[i : i + 1], key_valid[i : i + 1], scaling, window, pool,
                                     metric) for i in range(bsz)])
    groups = n_q_heads // n_kv
    q = query[:, :, -w:, :].float().reshape(bsz, n_kv, groups * w, dim)
    logits = torch.matmul(q, keys.float().transpose(-1, -2)) * scaling  # [B, H_kv, G*w, T]
    logits = logits.view(bsz, n_kv, groups, w, total)
    q_pos = torch.arange(total - w, total, device=keys.device)
    k_pos = torch.arange(total, device=keys.device)
    allowed = (k_pos[None, :] <= q_pos[:, None])[None] & key_valid[:, None, :]  # [B, w, T]
    probs = torch.softmax(logits.masked_fill_(~allowed[:, None, None], NEG_INF), dim=-1).nan_to_num_(0.0)
    if metric == "l2":
        probs = probs * probs
    elif metric != "l1":
        raise ValueError(f"metric must be 'l2' or 'l1', not {metric!r}")
    real_q = key_valid[:, -w:].to(probs.dtype)[:, None, None, :, None]  # a window query is real when its token is
    per_head = (probs * real_q).sum(dim=3)  # [B, H_kv, G, T]
    if pool > 1:
        flat = per_head.reshape(-1, 1, total)
        per_head = torch.nn.functional.max_pool1d(flat, pool, stride=1, padding=pool // 2)[:, 0, :total]
        per_head = per_head.view(bsz, n_kv, groups, total)
    return per_head.sum(dim=2) * key_valid[:, None, :]


# ----------------------------------------------------------------------------------------------------------
# Ragged storage and attention over it
# ----------------------------------------------------------------------------------------------------------


def _exclusive_cumsum(counts: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(counts, 0) - counts


def take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x[idx]`` for an int64 index tensor ``idx`` (any shape) over ``x``'s first dim, as one ``index_select``
    (bit-identical; 4-7x faster than advanced indexing on CPU for the small tensors of a decode step)."""
    return x.index_select(0, idx.reshape(-1)).view(*idx.shape, *x.shape[1:])


def _segment_best_first(seg: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """int64 sort key ``[n]``: ascending by ``seg`` (int64 ``[n]``, ``< 2**31``), then by ``score`` (float32 ``[n]``,
    ``>= 0`` or ``+inf``) descending. A stable sort by it orders entries by segment, best first, ties in their
    original order — as a stable sort by score (descending) followed by a stable sort by segment, in one sort. The
    bits of a non-negative float32 read as an int32 are monotone in its value (``+ 0.0`` turns a ``-0.0`` into
    ``0.0``)."""
    bits = (score.float() + 0.0).contiguous().view(torch.int32).to(torch.int64)
    return seg * (1 << 32) + (0x7F800000 - bits)


class RaggedStorage:
    """What one layer keeps: blocks of ``block`` tokens, each owned by one (row, KV head) *segment*.

    Tensors (``N`` blocks, ``S = B * H_kv`` segments, segment ``s = row * H_kv + head``):
        keys / values: ``[N, block, d]``; positions: int32 ``[N, block]`` (each slot's index in the full sequence);
        scores: float32 ``[N, block]`` (``-inf``: an empty slot at the end of a segment's last block; ``+inf``: a
        sink); block_seg: int64 ``[N]`` (owner segment, ascending: a segment's blocks are contiguous);
        lengths: int64 ``[S]`` (tokens each segment holds). Within a segment, slots ``0 .. lengths[s] - 1`` are
        filled in position order.
    """

    def __init__(self, block: int):
        self.block = block
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None
        self.scores: torch.Tensor | None = None
        self.block_seg: torch.Tensor | None = None
        self.lengths: torch.Tensor | None = None
        self.store: ValueStore | None = None  # KCache: ``values`` live in this store (set before the first pack)
        self._table: torch.Tensor | None = None
        self._derived: dict = {}  # per-layout tensors (bias, readout maps), recomputed after pack / select

    def bias(self, dtype: torch.dtype) -> torch.Tensor:
        """``[N, 1, block]`` additive attention mask: 0 on filled slots, ``-inf`` on empty ones. Scores are ``>= 0``
        on filled slots (``+inf`` on sinks) and only grow between layout changes, so it lasts until the next one."""
        key = ("bias", dtype)
        if key not in self._derived:
            self._derived[key] = self.scores.clamp(max=0.0)[:, None, :].to(dtype)
        return self._derived[key]

    def readout_maps(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """KCache's top-N readout: ``safe`` int64 ``[S, W]`` (:meth:`block_table` with ``-1`` read as block 0),
        ``pad`` bool ``[S, W * block]`` (slots past a segment's last block) and ``flat`` int64 ``[S, W * block]``
        (each slot's index in the blocks flattened to ``[N * block]``, 0 for padding)."""
        if "readout" not in self._derived:
            table = self.block_table()
            segs, width = table.shape
            safe = table.clamp(min=0)
            pad = (table < 0)[:, :, None].expand(segs, width, self.block).reshape(segs, width * self.block)
            j = torch.arange(self.block, device=table.device)
            flat = (safe[:, :, None] * self.block + j).reshape(segs, width * self.block).masked_fill(pad, 0)
            self._derived["readout"] = (safe, pad, flat)
        return self._derived["readout"]

    def readout_split(self, topn: int, n_tail: int) -> tuple | None:
        """KCache's top-N readout, which segments need a selection: those holding more than ``topn`` tokens, body
        plus a dense tail of ``n_tail``; a segment holding at most ``topn`` reads every row, exactly.

        Returns None when no segment holds more (the step reads everything); otherwise ``(over, safe, pad, flat,
        under_blocks, under_rows, under_seg, under_tokens)``: ``over`` int64 ``[S_o]`` the segments that select
        (None when all of them do: the maps are then whole and the ``under_*`` entries None / 0), ``safe`` / ``pad``
        / ``flat`` their rows of :meth:`readout_maps` (``[S_o, W]``, ``[S_o, W * block]``), ``under_blocks`` int64
        ``[N_u]`` the blocks of the other segments, ``under_rows`` int64 ``[N_u * block]`` those blocks' slots
        flattened, ``under_seg`` int64 ``[N_u]`` their segments, ``under_tokens`` the tokens the other segments hold
        (body and tail, an int). Computed once per layout and tail length, on the host (one synchronisation per
        layout)."""
        key = ("split", topn, n_tail)
        if key not in self._derived:
            if "lengths" not in self._derived:
                self._derived["lengths"] = self.lengths.tolist()
            lengths = self._derived["lengths"]
            over = [s for s, held in enumerate(lengths) if held + n_tail > topn]
            safe, pad, flat = self.readout_maps() if over else (None, None, None)
            if not over:
                split = None
            elif len(over) == len(lengths):
                split = (None, safe, pad, flat, None, None, None, 0)
            else:
                device = self.lengths.device
                over_idx = torch.tensor(over, dtype=torch.int64, device=device)
                is_over = torch.zeros(len(lengths), dtype=torch.bool, device=device).index_fill_(0, over_idx, True)
                under_blocks = torch.nonzero(~is_over.index_select(0, self.block_seg)).view(-1)
                under_rows = (under_blocks[:, None] * self.block + torch.arange(self.block, device=device)).view(-1)
                under_tokens = sum(lengths) - sum(lengths[s] for s in over) + (len(lengths) - len(over)) * n_tail
                split = (over_idx, take(safe, over_idx), take(pad, over_idx), take(flat, over_idx), under_blocks,
                         under_rows, self.block_seg.index_select(0, under_blocks), under_tokens)
            self._derived[key] = split
        return self._derived[key]

    def block_table(self) -> torch.Tensor:
        """int64 ``[S, max blocks]``: each segment's blocks in order, ``-1`` past its last (KCache's top-N readout)."""
        if self._table is None:
            segments = self.lengths.numel()
            n_blocks = torch.bincount(self.block_seg, minlength=segments)
            width = int(n_blocks.max()) if segments else 0
            j = torch.arange(width, device=n_blocks.device)
            first = _exclusive_cumsum(n_blocks)
            self._table = torch.where(j[None, :] < n_blocks[:, None], first[:, None] + j[None, :], -1)
        return self._table

    def pack(self, seg: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
             scores: torch.Tensor, segments: int) -> None:
        """Fill the storage from flat entries sorted by (segment, position): ``seg`` int64 ``[n]``, ``keys``/``values``
        ``[n, d]``, ``positions`` ``[n]``, ``scores`` ``[n]``."""
        blk = self.block
        device = keys.device
        lengths = torch.bincount(seg, minlength=segments)
        n_blocks = (lengths + blk - 1) // blk
        # each entry's slot in the blocks flattened to [N * block]: its segment's first block, then its rank in it
        slot = torch.arange(seg.numel(), device=device) + (_exclusive_cumsum(n_blocks) * blk
                                                           - _exclusive_cumsum(lengths)).index_select(0, seg)
        total_blocks = int(n_blocks.sum())
        dim = keys.shape[-1]
        self.keys = keys.new_zeros(total_blocks, blk, dim)
        self.positions = torch.zeros(total_blocks, blk, dtype=torch.int32, device=device)
        self.scores = torch.full((total_blocks, blk), NEG_INF, dtype=torch.float32, device=device)
        self.keys.view(-1, dim).index_copy_(0, slot, keys)
        if self.store is None:
            self.values = values.new_zeros(total_blocks, blk, dim)
            self.values.view(-1, dim).index_copy_(0, slot, values)
        else:  # KCache: the blocks' values are written straight into the store
            home = self.store.device
            self.values = self.store.put(self.store.zeros((total_blocks, blk, dim), values.dtype))
            self.values.view(-1, dim).index_copy_(0, slot.to(home), values.to(home))
            sums = torch.zeros(segments, dim, dtype=torch.float32, device=values.device)
            self.store.sums = sums.index_add_(0, seg.to(values.device), values.float()).to(device)  # [S, d]
        self._table = None
        self._derived = {}
        self.positions.view(-1).index_copy_(0, slot, positions.to(torch.int32))
        self.scores.view(-1).index_copy_(0, slot, scores.float())
        self.block_seg = torch.repeat_interleave(torch.arange(segments, device=device), n_blocks)
        self.lengths = lengths

    def entries(self):
        """Flat ``(seg, keys, values, positions, scores)`` of every filled slot, sorted by (segment, position)."""
        filled = self.scores > NEG_INF
        seg = self.block_seg[:, None].expand_as(filled)[filled]
        values = self.values[filled.to(self.values.device)]  # on the store's device with KCache
        return seg, self.keys[filled], values, self.positions[filled].long(), self.scores[filled]

    def select_segments(self, sel: torch.Tensor) -> None:
        """Keep segments ``sel`` (int64 ``[S']``, may repeat) as the new segments ``0 .. S' - 1``."""
        n_blocks = torch.bincount(self.block_seg, minlength=self.lengths.numel())
        first = _exclusive_cumsum(n_blocks)
        counts = n_blocks[sel]
        new_first = _exclusive_cumsum(counts)
        total = int(counts.sum())
        rank = torch.arange(total, device=sel.device) - torch.repeat_interleave(new_first, counts)
        idx = torch.repeat_interleave(first[sel], counts) + rank
        for name in ("keys", "values", "positions", "scores"):
            tensor = getattr(self, name)
            setattr(self, name, tensor[idx.to(tensor.device)])
        if self.store is not None:
            sums = self.store.sums
            self.values = self.store.put(self.values)
            self.store.sums = None if sums is None else sums[sel.to(sums.device)]
        self.block_seg = torch.repeat_interleave(torch.arange(sel.numel(), device=sel.device), counts)
        self.lengths = self.lengths[sel]
        self._table = None
        self._derived = {}

    def tensors(self) -> tuple:
        resident = self.store.resident() if self.store is not None else ()
        return (self.keys, self.values, self.positions, self.scores, self.block_seg, self.lengths, *resident)

    def clear(self) -> None:
        self.keys = self.values = self.positions = self.scores = self.block_seg = self.lengths = None
        self._table = None
        self._derived = {}
        if self.store is not None:
            self.store.clear()


def ragged_attend(
    query: torch.Tensor,
    body: RaggedStorage,
    tail_keys: torch.Tensor,
    tail_values: torch.Tensor,
    tail_allowed: torch.Tensor | None,
    scaling: float,
    metric: str = "l2",
    topn: int = 0,
    estimator: str = "residual_mean",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_ragged_attend` (its doc) over blocks of the chunk's queries (``runtime.pyramidinfer.query_block``:
    a long chunk of a chunked prefill does not hold logits for all its queries at once); votes are summed over the
    blocks, as over the queries of one block. One block for a decode step or a short chunk."""
    bsz, n_q_heads, q_len, dim = query.shape
    n_kv = tail_keys.shape[1]
    rows = body.keys.shape[0] * body.block + bsz * n_kv * tail_keys.shape[2]  # every slot held, all heads
    # per query head: a logit per slot held, and its query copied once per block (``qs[seg]``)
    step = query_block(n_q_heads // n_kv, rows + (body.keys.shape[0] + bsz * n_kv) * dim)
    if q_len <= step or tail_allowed is None:
        return _ragged_attend(query, body, tail_keys, tail_values, tail_allowed, scaling, metric, topn, estimator)
    outs, votes_b, votes_t = [], None, None
    for start in range(0, q_len, step):
        out, vb, vt = _ragged_attend(query[:, :, start : start + step], body, tail_keys, tail_values,
                                     tail_allowed[:, start : start + step], scaling, metric, topn, estimator,
                                     decode=False, count=start == 0)
        outs.append(out)
        votes_b = vb if votes_b is None else votes_b + vb
        votes_t = vt if votes_t is None else votes_t + vt
    return torch.cat(outs, dim=1), votes_b, votes_t


def _ragged_attend(
    query: torch.Tensor,
    body: RaggedStorage,
    tail_keys: torch.Tensor,
    tail_values: torch.Tensor,
    tail_allowed: torch.Tensor,
    scaling: float,
    metric: str = "l2",
    topn: int = 0,
    estimator: str = "residual_mean",
    decode: bool = True,
    count: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact attention of ``query`` over a ragged body plus a dense tail, and each slot's vote.

    ``decode``: False for a block of a longer chunk (reads every value row whatever its length); ``count``: whether
    this call counts the value rows it read in the KCache store's counters (once per chunk).

    Args:
        query: ``[B, H_q, Q, d]`` (query head ``k * G + g`` belongs to KV head ``k``, ``G = H_q / H_kv``).
        body: blocks every query may attend to (all older than the queries).
        tail_keys / tail_values: ``[B, H_kv, n, d]`` the newest tokens, held densely (every head has them).
        tail_allowed: bool ``[B, Q, n]``: which tail tokens each query may attend to (causality, padding), or None
            when every query may attend to every tail token (a decode step without padding).
        scaling: softmax scale.
        metric: ``l2``: the votes are squared probabilities, ``l1``: probabilities.
        topn: KCache (``body.store`` set): a single query per row reads only the ``topn`` value rows per (row, KV
            head) of largest probability summed over the group's query heads, body and tail together, the output
            estimated from them by ``estimator`` (:func:`_topn_readout`); a longer chunk, or ``topn`` at least what
            a head holds, reads every row. Keys, scores and votes are always exact.

    Returns:
        output ``[B, Q, H_q, d]`` (the layout transformers' attention functions return), body votes float32
        ``[N, block]`` and tail votes float32 ``[B, H_kv, n]`` (summed over the group's query heads and queries).
    """
    bsz, n_q_heads, q_len, dim = query.shape
    n_kv, n_tail = tail_keys.shape[1], tail_keys.shape[2]
    groups = n_q_heads // n_kv
    segs = bsz * n_kv
    gq = groups * q_len
    work = torch.float32 if query.dtype in (torch.float16, torch.bfloat16) else query.dtype
    qs = query.reshape(segs, gq, dim).to(work)  # [S, G*Q, d]: segment s = row * H_kv + head
    seg = body.block_seg
    # scores are >= 0 for filled slots and -inf for empty ones: clamp(max=0) is the additive mask
    bias_b = body.bias(work)  # [N, 1, blk]
    logits_b = torch.baddbmm(bias_b, take(qs, seg), body.keys.to(work).transpose(1, 2), alpha=scaling)  # [N, GQ, blk]
    tail_k = tail_keys.to(work).reshape(segs, n_tail, dim)
    if tail_allowed is None:
        logits_t = torch.bmm(qs, tail_k.transpose(1, 2)).mul_(scaling)  # [S, GQ, n]
    else:
        bias_t = torch.zeros(tail_allowed.shape, dtype=work, device=query.device).masked_fill_(~tail_allowed, NEG_INF)
        bias_t = bias_t[:, None, None].expand(bsz, n_kv, groups, q_len, n_tail).reshape(segs, gq, n_tail)
        logits_t = torch.baddbmm(bias_t, qs, tail_k.transpose(1, 2), alpha=scaling)
    top = logits_t.amax(dim=-1)  # [S, GQ]
    block_top = logits_b.amax(dim=-1)  # [N, GQ]
    top = top.scatter_reduce(0, seg[:, None].expand_as(block_top), block_top, "amax", include_self=True)
    top = top.masked_fill_(top == NEG_INF, 0.0)  # a query that may attend to nothing (padding) outputs 0
    exp_b = logits_b.sub_(take(top, seg)[:, :, None]).exp_()
    exp_t = logits_t.sub_(top[:, :, None]).exp_()
    denom = exp_t.sum(dim=-1).index_add_(0, seg, exp_b.sum(dim=-1))  # [S, GQ]
    inv = 1.0 / denom.clamp_(min=torch.finfo(work).tiny)  # [S, GQ]
    store = body.store
    held_rows = body.keys.shape[0] * body.block + segs * n_tail
    split = None
    if store is not None and 0 < topn and q_len == 1 and decode:
        split = body.readout_split(topn, n_tail)
    if split is not None:
        result = _topn_readout(exp_b, exp_t, inv, body, tail_values, tail_allowed, topn, work, estimator, split)
        result = result.to(query.dtype)
    else:
        body_values = body.values
        if store is not None:
            if count:
                store.count(held_rows, held_rows)
            body_values = store.to_model(body_values)
        tail = tail_values.to(work).reshape(segs, n_tail, dim)
        result = _weighted_sum(exp_t, tail, exp_b, body_values.to(work), seg, inv).to(query.dtype)  # [S, GQ, d]
    result = result.view(bsz, n_q_heads, q_len, dim).transpose(1, 2).contiguous()
    # votes: sum over the group's query heads (and queries) of p (l1) or p**2 (l2), p = exp / denom
    if metric == "l2":
        weight = inv * inv
        exp_b, exp_t = exp_b.mul_(exp_b), exp_t.mul_(exp_t)
    else:
        weight = inv
    votes_b = torch.bmm(take(weight, seg)[:, None, :], exp_b)[:, 0]  # [N, blk]
    votes_t = torch.bmm(weight[:, None, :], exp_t)[:, 0].view(bsz, n_kv, n_tail)
    return result, votes_b.float(), votes_t.float()


def _weighted_sum(exp_t: torch.Tensor, tail: torch.Tensor, exp_b: torch.Tensor, body_values: torch.Tensor,
                  block_seg: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """Exact attention output ``[S, GQ, d]`` from every row read: tail ``exp_t`` ``[S, GQ, n]`` x ``tail``
    ``[S, n, d]``, plus body blocks ``exp_b`` ``[N', GQ, block]`` x ``body_values`` ``[N', block, d]`` summed into
    their segments ``block_seg`` ``[N']``, normalised by ``inv`` ``[S, GQ]``."""
    out = torch.bmm(exp_t, tail)
    out.index_add_(0, block_seg, torch.bmm(exp_b, body_values))
    return out.mul_(inv[:, :, None])


def _put_tail_rows(values: torch.Tensor, ids: torch.Tensor, tail: torch.Tensor, n_body: int, most: int) -> None:
    """Write the tail's value rows into the selected rows that come from the tail (in place).

    ``values`` ``[S, k, d]`` holds the rows fetched for ``ids`` ``[S, k]`` (``>= n_body``: row ``ids - n_body`` of
    ``tail`` ``[S * n, d]``; those were fetched clamped, i.e. wrong). A segment selects at most ``most`` tail slots
    (its ``n`` tail candidates), so they are among the ``most`` largest of the ``from tail`` flags: only those ``most``
    columns are read and written — the same values as a ``where`` over all ``k`` rows, without two passes over
    ``[S, k, d]`` and without a host synchronisation."""
    from_tail = ids >= n_body
    cols = from_tail.to(torch.uint8).topk(most, dim=1, sorted=False).indices  # [S, most]
    rows = tail.index_select(0, (ids.gather(1, cols) - n_body).clamp(min=0).view(-1)).view(*cols.shape, -1)
    where = cols[..., None].expand(rows.shape)
    values.scatter_(1, where, torch.where(from_tail.gather(1, cols)[..., None], rows, values.gather(1, where)))


def _topn_readout(
    exp_b: torch.Tensor, exp_t: torch.Tensor, inv: torch.Tensor, body: RaggedStorage, tail_values: torch.Tensor,
    tail_allowed: torch.Tensor | None, topn: int, work: torch.dtype, estimator: str, split: tuple,
) -> torch.Tensor:
    """KCache over ragged storage: a segment that holds at most ``topn`` tokens reads all its value rows (exact); each
    other segment (``split``: :meth:`RaggedStorage.readout_split`) reads the ``topn`` slots (body and tail) of largest
    probability summed over its query heads, in one gather from the store for all of them, its output estimated from
    them (``runtime.kcache.estimate``: ``residual_mean`` with the store's per-segment value sums plus the tail's, or
    ``renormalise``). Per segment, the rows read are the ``min(topn, held)`` a padded selection over every segment
    would take, without reading (or multiplying) the padding of the narrow segments up to ``topn``.

    Args:
        exp_b: ``[N, GQ, block]`` / exp_t: ``[S, GQ, n]``: unnormalised probabilities (``exp(logit - max)``, 0 for
            empty or masked slots) of body blocks and tail; inv: ``[S, GQ]`` their softmax normalisers.
        tail_values: ``[B, H_kv, n, d]`` (with the model); tail_allowed: bool ``[B, 1, n]`` the real tail tokens, or
            None (all).

    Returns:
        ``[S, GQ, d]`` in ``work`` dtype.
    """
    over, safe, pad, flat, under_blocks, under_rows, under_seg, under_tokens = split
    n_blocks, gq, blk = exp_b.shape
    segs, _, n_tail = exp_t.shape
    n_over = segs if over is None else over.shape[0]
    tail = tail_values.to(work).reshape(segs, n_tail, -1)
    dim = tail.shape[-1]
    out = None
    if over is not None:  # the segments that hold at most topn tokens: every row, exactly
        rows = body.store.fetch(body.values, under_rows).to(work).view(-1, blk, dim)  # [N_u, blk, d]
        out = _weighted_sum(exp_t, tail, exp_b.index_select(0, under_blocks), rows, under_seg, inv)
    estimated = _select_and_estimate(exp_b, exp_t, inv, body, tail, tail_allowed, topn, work, estimator, over, safe,
                                     pad, flat)
    body.store.count(n_over * topn + under_tokens, n_blocks * blk + segs * n_tail)
    if out is None:
        return estimated
    return out.index_copy_(0, over, estimated)


def _select_and_estimate(
    exp_b: torch.Tensor, exp_t: torch.Tensor, inv: torch.Tensor, body: RaggedStorage, tail: torch.Tensor,
    tail_allowed: torch.Tensor | None, topn: int, work: torch.dtype, estimator: str, over: torch.Tensor,
    safe: torch.Tensor, pad: torch.Tensor, flat: torch.Tensor,
) -> torch.Tensor:
    """The top-N part of :func:`_topn_readout` for segments ``over`` (int64 ``[S_o]``, None: all), each holding
    more than ``topn`` tokens; ``tail`` ``[S, n, d]`` in ``work`` dtype. Returns ``[S_o, GQ, d]``."""
    n_blocks, gq, blk = exp_b.shape
    segs, _, n_tail = exp_t.shape
    n_over = segs if over is None else over.shape[0]
    dim = tail.shape[-1]
    n_body = n_blocks * blk

    def subset(x: torch.Tensor) -> torch.Tensor:
        return x if over is None else x.index_select(0, over)

    inv_o = subset(inv)  # [S_o, GQ]
    exp_t_o = subset(exp_t)  # [S_o, GQ, n]
    score_b = torch.bmm(take(inv, body.block_seg)[:, None, :], exp_b)[:, 0]  # [N, blk]: summed probability per slot
    score_t = torch.bmm(inv_o[:, None, :], exp_t_o)[:, 0]  # [S_o, n]
    cand = torch.cat([take(score_b, safe).view(n_over, -1).masked_fill_(pad, -1.0), score_t], dim=1)  # -1: padding
    sel = top_slots(cand, topn)  # [S_o, k]
    real = cand.gather(1, sel) >= 0
    # each candidate's row among the body's flattened slots followed by the tail's ([S * n]), then the selected ones
    tail_ids = subset(torch.arange(n_body, n_body + segs * n_tail, device=sel.device).view(segs, n_tail))  # [S_o, n]
    ids = torch.cat([flat, tail_ids], dim=1).gather(1, sel)  # [S_o, k]
    exp_rows = torch.cat([exp_b.transpose(1, 2).reshape(n_body, gq), exp_t.transpose(1, 2).reshape(segs * n_tail, gq)])
    weights = take(exp_rows, ids)  # [S_o, k, GQ]
    if not n_body:
        values = tail.reshape(segs * n_tail, dim).index_select(0, ids.view(-1)).view(n_over, topn, dim)
    else:  # the only value rows read from the store
        values = body.store.fetch(body.values, ids.clamp(max=n_body - 1)).to(work)  # [S_o, k, d]
        if n_tail:
            _put_tail_rows(values, ids, tail.reshape(segs * n_tail, dim), n_body, min(n_tail, topn))
    weights = weights * real[..., None]
    weights = weights.transpose(1, 2) * inv_o[:, :, None]  # [S_o, GQ, k]: exact probabilities of the selected slots
    if estimator != "residual_mean":
        return estimate(weights, values, None, None)
    tail_o = subset(tail)  # [S_o, n, d]
    if tail_allowed is None:
        tail_real = torch.ones(n_over, n_tail, dtype=torch.bool, device=tail.device)
    else:
        n_kv = segs // tail_allowed.shape[0]
        tail_real = subset(tail_allowed[:, -1, None, :].expand(-1, n_kv, n_tail).reshape(segs, n_tail))
    sums = subset(body.store.sums) + (tail_o * tail_real[..., None]).sum(dim=1, dtype=torch.float32)  # [S_o, d]
    count = subset(body.lengths) + tail_real.sum(dim=-1)  # [S_o]
    return estimate(weights, values, sums, count)


# ----------------------------------------------------------------------------------------------------------
# The cache layer
# ----------------------------------------------------------------------------------------------------------


class RaggedLayer(CompressingLayer, DynamicLayer):
    """Cache layer where every KV head keeps its own budget of tokens (KV-Compress), in :class:`RaggedStorage`.

    The first forward (the prefill) attends exactly over everything (transformers' SDPA), then each (row, head)
    keeps its ``budget`` best tokens by :func:`kvc_scores`. Later tokens wait in a dense tail ``[B, H_kv, n, d]``
    (attention covers body and tail exactly) and
    are merged into the blocks every ``slack`` tokens, when each head over its budget evicts its lowest-scored
    tokens (sinks and the recent window protected). Decisions are per (row, head) from that row's own counts and
    scores, and the merge happens at the same step for every row, so a row of a padded batch evolves exactly as it
    would alone.
    """

    reads_own_columns_only = True  # later chunks: tail scores (> -inf) for older tail tokens, the mask's last Q columns

    def __init__(self, params: HeadParams, readers: int = 0, topn: int = 0, estimator: str = "residual_mean"):
        super().__init__()
        check_estimator(estimator)
        self.params = params
        self.readers = readers
        self.topn = int(topn)  # KCache: value rows a decode step reads per (row, KV head); 0 = values stay
        self.estimator = estimator
        self.body = RaggedStorage(params.block)
        self._tail_k: torch.Tensor | None = None  # [B, H_kv, capacity, d]; the first n_tail slots are used
        self._tail_v: torch.Tensor | None = None
        self._tail_s: torch.Tensor | None = None  # float32 [B, H_kv, capacity]; -inf: not a real token
        self.n_tail = 0
        self.tail_start = 0  # position of the first tail token
        self._prefill: tuple[torch.Tensor, torch.Tensor] | None = None  # the first chunk's K/V until compressed
        self._pending: dict | None = None
        self.seen = 0
        self.real_seen: torch.Tensor | None = None  # int64 [B]
        self.compressed = False

    # ----- the dense tail ---------------------------------------------------------------------------------------
    @property
    def tail_keys(self) -> torch.Tensor:
        return self._tail_k[:, :, : self.n_tail]

    @property
    def tail_values(self) -> torch.Tensor:
        return self._tail_v[:, :, : self.n_tail]

    @property
    def tail_scores(self) -> torch.Tensor:
        return self._tail_s[:, :, : self.n_tail]

    def _tail_append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Append a chunk to the tail (it holds exactly its tokens: at most ``slack`` after a merge)."""
        self._tail_k = torch.cat([self.tail_keys, key_states], dim=-2)
        self._tail_v = torch.cat([self.tail_values, value_states], dim=-2)
        # new tokens are real until the forward's mask says otherwise (_finish_step)
        self._tail_s = torch.cat([self.tail_scores, self._tail_s.new_zeros(key_states.shape[:3])], dim=-1)
        self.n_tail = self._tail_k.shape[2]

    # ----- transformers' layer protocol -------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor, *args) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if not self.compressed:
            if self._prefill is None:
                # a copy: the model's tensor may be a view of a larger (fused) buffer
                self._prefill = (key_states.clone(), value_states.clone())
            else:
                self._prefill = (torch.cat([self._prefill[0], key_states], dim=-2),
                                 torch.cat([self._prefill[1], value_states], dim=-2))
            keys, values = self._prefill
        else:
            self._tail_append(key_states, value_states)
            keys, values = key_states, value_states  # kvplan's attention reads the storage, not these
        self.seen += key_states.shape[-2]
        return keys, values

    def current_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._prefill is not None:
            return self._prefill
        return self.tail_keys, self.tail_values

    def reset(self) -> None:
        self.body.clear()
        self._tail_k = self._tail_v = self._tail_s = None
        self.n_tail = 0
        self.tail_start = 0
        self._prefill = None
        self._pending = None
        self.keys = self.values = None
        self.is_initialized = False
        self.seen = 0
        self.real_seen = None
        self.compressed = False

    def crop(self, *args, **kwargs) -> None:
        raise NotImplementedError(
            "a KV-Compress layer cannot be cropped (assisted/speculative decoding rolls back tokens it may have "
            "evicted); generate without an assistant model while a plan is applied"
        )

    def _select_rows(self, rows: torch.Tensor) -> None:
        if self._prefill is not None:
            self._prefill = (self._prefill[0][rows], self._prefill[1][rows])
        if not self.compressed:
            return
        n_kv = self._tail_k.shape[1]
        sel = (rows[:, None] * n_kv + torch.arange(n_kv, device=rows.device)).reshape(-1)
        self.body.select_segments(sel)
        self._tail_k, self._tail_v, self._tail_s = self._tail_k[rows], self._tail_v[rows], self._tail_s[rows]
        self.real_seen = self.real_seen[rows]

    def batch_repeat_interleave(self, repeats: int) -> None:
        bsz = self._batch_size()
        self._select_rows(torch.arange(bsz, device=self.device).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_rows(indices.to(self.device).long())

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_rows(beam_idx.to(self.device).long())

    def join_rows(self, others: list) -> None:
        parts = [self, *others]
        check_same(parts, "is_initialized", "seen", "compressed", "n_tail", "tail_start", "readers", "topn")
        if any(part._pending is not None for part in parts):
            raise ValueError("kvplan: cannot join the batch rows of a layer in the middle of a forward")
        if not self.compressed:
            if any(part._prefill is not None for part in parts):
                self._prefill = (cat_rows([part._prefill[0] for part in parts]),
                                 cat_rows([part._prefill[1] for part in parts]))
            return
        # the blocks: every part's entries (sorted by segment, position), segments renumbered after the rows before;
        # packed as one batch packs them
        entries, offset = [], 0
        for part in parts:
            seg, keys, values, positions, scores = part.body.entries()
            entries.append((seg + offset, keys, values, positions, scores))
            offset += part.body.lengths.numel()
            if part is not self:
                part.body.clear()
        seg, keys, values, positions, scores = (torch.cat(column) for column in zip(*entries))
        del entries
        if self.body.store is not None:
            self.body.store.join_rows([part.body.store for part in others], dense=False)
        self.body.pack(seg, keys, values, positions, scores, offset)
        del seg, keys, values, positions, scores
        self._tail_k = cat_rows([part.tail_keys for part in parts])
        self._tail_v = cat_rows([part.tail_values for part in parts])
        self._tail_s = cat_rows([part.tail_scores for part in parts])
        self.real_seen = cat_rows([part.real_seen for part in parts])

    def _batch_size(self) -> int:
        if self._prefill is not None:
            return self._prefill[0].shape[0]
        return self._tail_k.shape[0]

    # ----- the plan-layer interface -----------------------------------------------------------------------------
    def held(self) -> Held:
        """What the layer holds, materialised as a rectangle ``[B, H_kv, W, d]`` (``W`` = the widest head; for
        inspection and tests — attention never builds it)."""
        if not self.compressed:
            if self._prefill is None:
                raise RuntimeError("kvplan: the layer has not cached anything yet")
            return Held(*self._prefill)
        bsz, n_kv, _, dim = self._tail_k.shape
        seg, src, pos, _ = self._entries()
        keys, values = self._gather(src, self.body.keys, self.tail_keys), self._gather(src, self.body.values,
                                                                                      self.tail_values)
        segs = bsz * n_kv
        lengths = torch.bincount(seg, minlength=segs)
        width = int(lengths.max()) if lengths.numel() else 0
        slot = torch.arange(seg.numel(), device=seg.device) - take(_exclusive_cumsum(lengths), seg)
        out_k = keys.new_zeros(segs, width, dim)
        out_v = values.new_zeros(segs, width, dim)
        out_p = torch.zeros(segs, width, dtype=torch.int64, device=seg.device)
        valid = torch.zeros(segs, width, dtype=torch.bool, device=seg.device)
        out_k[seg, slot], out_p[seg, slot], valid[seg, slot] = keys, pos, True
        out_v[seg.to(out_v.device), slot.to(out_v.device)] = values
        out_v = out_v.to(out_k.device)
        shape = (bsz, n_kv, width)
        return Held(out_k.view(*shape, dim), out_v.view(*shape, dim), out_p.view(shape), valid.view(shape))

    def _entries(self):
        """Every slot held, as flat int64 ``seg`` (owner), ``src`` (index into the body's flattened slots, or
        ``N * block +`` index into the flattened tail), ``pos`` and float32 ``score``, grouped by segment in
        position order."""
        bsz, n_kv = self._tail_k.shape[:2]
        body_scores = self.body.scores.reshape(-1)
        b_src = (body_scores > NEG_INF).nonzero()[:, 0]
        b_seg = take(self.body.block_seg.repeat_interleave(self.body.block), b_src)
        t_scores = self.tail_scores.reshape(-1)
        t_src = (t_scores > NEG_INF).nonzero()[:, 0]
        n_tail = self.n_tail
        t_seg = torch.div(t_src, max(n_tail, 1), rounding_mode="floor")
        t_pos = self.tail_start + t_src % max(n_tail, 1)
        # body slots of a segment (in position order), then its tail: both lists are already grouped by segment in
        # ascending order, so each entry's place follows from the counts (a stable counting sort by segment)
        segs = bsz * n_kv
        n_b, n_t = torch.bincount(b_seg, minlength=segs), torch.bincount(t_seg, minlength=segs)
        start = _exclusive_cumsum(n_b + n_t)
        place = torch.cat([torch.arange(b_seg.numel(), device=b_seg.device)
                           + take(start - _exclusive_cumsum(n_b), b_seg),
                           torch.arange(t_seg.numel(), device=t_seg.device)
                           + take(start + n_b - _exclusive_cumsum(n_t), t_seg)])
        order = torch.empty_like(place).scatter_(0, place, torch.arange(place.numel(), device=place.device))
        seg = torch.cat([b_seg, t_seg])
        src = take(torch.cat([b_src, t_src + body_scores.numel()]), order)
        pos = take(torch.cat([take(self.body.positions.reshape(-1), b_src).long(), t_pos]), order)
        score = take(torch.cat([take(body_scores, b_src), take(t_scores, t_src)]), order)
        return take(seg, order), src, pos, score

    def _gather(self, src: torch.Tensor, body: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
        """Rows ``src`` (as :meth:`_entries` numbers them) of the body's and the tail's ``[.., d]`` tensors."""
        dim = body.shape[-1]
        flat_body = body.reshape(-1, dim)
        n_body = flat_body.shape[0]
        src = src.to(body.device)
        if n_body == 0:
            return tail.reshape(-1, dim).to(body.device).index_select(0, src)
        out = flat_body.index_select(0, src.clamp(max=n_body - 1))  # on the body's device (the KCache store)
        from_tail = (src >= n_body).nonzero()[:, 0]  # the few tail rows (at most slack per segment)
        out[from_tail] = tail.reshape(-1, dim).to(body.device).index_select(0, src[from_tail] - n_body)
        return out

    def holds_anything(self) -> bool:
        return self.compressed or self._prefill is not None

    def kept_lengths(self) -> torch.Tensor:
        if not self.compressed:
            if self._prefill is None:
                return torch.zeros(0, 0, dtype=torch.int64)
            bsz, n_kv, width, _ = self._prefill[0].shape
            return torch.full((bsz, n_kv), width, dtype=torch.int64)
        bsz, n_kv = self._tail_k.shape[:2]
        return self.body.lengths.view(bsz, n_kv) + (self.tail_scores > NEG_INF).sum(dim=-1)

    def kept_length(self) -> int:
        lengths = self.kept_lengths()
        return int(lengths.max()) if lengths.numel() else 0

    def value_stores(self) -> list:
        return [self.body.store] if self.body.store is not None else []

    def physical_bytes(self, by_device: bool = False):
        prefill = self._prefill or ()
        return tensor_bytes((*self.body.tensors(), self._tail_k, self._tail_v, self._tail_s, self.real_seen,
                             *prefill), by_device)

    # ----- attention --------------------------------------------------------------------------------------------
    def attention(self, query: torch.Tensor, full_mask: torch.Tensor | None, scaling: float, exact) -> torch.Tensor:
        """Output ``[B, Q, H_q, d]`` of ``query`` over what the layer holds, then the scores / compression."""
        if not self.compressed:
            keys, values = self._prefill
            out = exact(keys, values)
            valid = key_valid_from_mask(full_mask, keys.shape[0], keys.shape[2], keys.device)
            self._pending = {"prefill": True, "valid": valid, "votes": [self._prefill_votes(query, valid, scaling)]}
        else:
            q_len = query.shape[2]
            allowed = self._tail_allowed(full_mask, q_len)
            out, votes_b, votes_t = ragged_attend(query, self.body, self.tail_keys, self.tail_values, allowed,
                                                  scaling, self.params.metric, self.topn, self.estimator)
            self._pending = {"prefill": False, "allowed": allowed, "q_len": q_len, "votes": [(votes_b, votes_t)]}
            self._fresh_votes(self._pending, query, scaling)
        if self.readers == 0:
            self._finish_step()
        return out

    def reader_attention(self, query, full_mask, scaling, exact) -> torch.Tensor:
        """A sharing layer's ``query`` over this cache in the same forward; its attention votes too."""
        pending = self._pending
        if pending is None:
            raise RuntimeError("kvplan: a sharing layer attended before its source layer in this forward pass")
        if pending["prefill"]:
            keys, values = self._prefill
            out = exact(keys, values)
            pending["votes"].append(self._prefill_votes(query, pending["valid"], scaling))
        else:
            out, votes_b, votes_t = ragged_attend(query, self.body, self.tail_keys, self.tail_values,
                                                  pending["allowed"], scaling, self.params.metric, self.topn,
                                                  self.estimator)
            pending["votes"].append((votes_b, votes_t))
            self._fresh_votes(pending, query, scaling)
        if len(pending["votes"]) == self.readers + 1:
            self._finish_step()
        return out

    def _fresh_votes(self, pending: dict, query: torch.Tensor, scaling: float) -> None:
        """Chunked prefill of a left-padded batch: rows that held no real token before this chunk and get their first
        real tokens in it ("fresh" rows) are scored as the first chunk of their solo run is (:func:`kvc_scores` over
        the tail, which holds their chunk), and the step ends with a merge (as a first chunk ends compressed)."""
        allowed = pending["allowed"]
        if "fresh" not in pending:
            pending["fresh"] = None
            if allowed is None:  # no padding among the new tokens: every row already started
                return
            n_tail, q_len = self.n_tail, pending["q_len"]
            own = allowed[:, :, n_tail - q_len :].diagonal(dim1=1, dim2=2)  # [B, Q]: is each new token real
            fresh = (self.real_seen == 0) & own.any(dim=-1)
            if not bool(fresh.any()):
                return
            old = (self.tail_scores[:, :, : n_tail - q_len] > NEG_INF).any(dim=1)
            pending.update(fresh=fresh, key_valid=torch.cat([old, own], dim=-1), fresh_votes=[])
        if pending["fresh"] is None:
            return
        p = self.params
        pending["fresh_votes"].append(kvc_scores(query, self.tail_keys, pending["key_valid"], scaling, p.window,
                                                 p.pool, p.metric))

    def _prefill_votes(self, query, valid, scaling) -> torch.Tensor:
        p = self.params
        return kvc_scores(query, self._prefill[0], valid, scaling, p.window, p.pool, p.metric)

    def _tail_allowed(self, full_mask: torch.Tensor | None, q_len: int) -> torch.Tensor | None:
        """bool ``[B, Q, n]``: which tail tokens (the last ``n`` positions) each new query may attend to; None when
        every query may attend to every tail token (one new token per row, no padding among the tail)."""
        n_tail = self.n_tail
        bsz = self._tail_k.shape[0]
        if full_mask is None:
            if q_len == 1:
                return None
            q_pos = torch.arange(self.seen - q_len, self.seen, device=self._tail_k.device)
            t_pos = torch.arange(self.seen - n_tail, self.seen, device=self._tail_k.device)
            return (t_pos[None, :] <= q_pos[:, None]).expand(bsz, q_len, n_tail)
        # the tail's older tokens: the real ones (scores > -inf), which every query of a later chunk may attend to (a
        # left-padded row has real tokens before this chunk only if all its queries are real); the chunk's own: the
        # forward's mask over its last q_len columns (the only ones a narrowed mask has, CompressingLayer.short_mask)
        new = full_mask[:, 0, :, -q_len:].expand(bsz, q_len, q_len)
        old = (self.tail_scores[:, :, : n_tail - q_len] > NEG_INF).any(dim=1)  # [B, n_tail - Q]
        allowed = torch.cat([old[:, None, :].expand(bsz, q_len, n_tail - q_len), new], dim=-1)
        if q_len == 1 and bool(allowed.all()):
            return None
        return allowed

    def _finish_step(self) -> None:
        pending, self._pending = self._pending, None
        votes = pending["votes"]
        if pending["prefill"]:
            self._compress_prefill(torch.stack(votes).sum(dim=0) if len(votes) > 1 else votes[0], pending["valid"])
            return
        votes_b, votes_t = votes[0]
        for extra_b, extra_t in votes[1:]:
            votes_b, votes_t = votes_b + extra_b, votes_t + extra_t
        q_len, n_tail = pending["q_len"], self.n_tail
        tail_scores = self.tail_scores
        tail_scores.add_(votes_t)
        self.body.scores.add_(votes_b)
        allowed = pending["allowed"]
        if allowed is None:
            self.real_seen += 1
        else:
            own = allowed[:, :, n_tail - q_len :].diagonal(dim1=1, dim2=2)  # [B, Q]: is each new token real
            tail_scores[:, :, n_tail - q_len :].masked_fill_(~own[:, None, :], NEG_INF)
            self.real_seen += own.sum(dim=-1)
        fresh = pending.get("fresh")
        if fresh is not None:  # rows whose first real chunk this was: first-chunk scores, compressed now
            valid = pending["key_valid"]
            rank = valid.long().cumsum(dim=-1)
            first = torch.stack(pending["fresh_votes"]).sum(dim=0) if len(pending["fresh_votes"]) > 1 else (
                pending["fresh_votes"][0])
            first = first.masked_fill(~valid[:, None, :], NEG_INF)
            first = first.masked_fill((valid & (rank <= self.params.sink))[:, None, :], POS_INF)
            self._tail_s[:, :, :n_tail] = torch.where(fresh[:, None, None], first, tail_scores)
            self._merge()
        elif n_tail >= self.params.slack:
            self._merge()

    def _compress_prefill(self, scores: torch.Tensor, valid: torch.Tensor) -> None:
        """Keep, per (row, head), its budget of the prefill's real tokens (sinks and recent window protected)."""
        keys, values = self._prefill
        self._prefill = None
        bsz, n_kv, total, dim = keys.shape
        p = self.params
        rank = valid.long().cumsum(dim=-1)
        sink = valid & (rank <= p.sink)
        protected = valid & (sink | (torch.arange(total, device=keys.device) >= total - p.window))
        ranked = scores.masked_fill(~valid[:, None, :], NEG_INF).masked_fill(protected[:, None, :], POS_INF)
        self.real_seen = valid.sum(dim=-1)
        budget = p.budget(self.real_seen)  # [B, H_kv]
        order = torch.argsort(ranked, dim=-1, descending=True, stable=True)
        ranks = torch.empty_like(order)
        ranks.scatter_(-1, order, torch.arange(total, device=keys.device).expand_as(order))
        keep = (ranks < budget[..., None]) & valid[:, None, :]
        b, h, t = keep.nonzero(as_tuple=True)
        kept_scores = torch.where(sink[b, t], POS_INF, scores[b, h, t])  # sinks stay protected; the window ages out
        if self.topn > 0:  # KCache: from now on the blocks' values live in the store
            self.body.store = ValueStore(keys.device)
        self.body.pack(b * n_kv + h, keys[b, h, t], values[b, h, t], t, kept_scores, bsz * n_kv)
        self.n_tail = 0
        self.tail_start = self.seen
        self._tail_k = keys.new_zeros(bsz, n_kv, 0, dim)
        self._tail_v = values.new_zeros(bsz, n_kv, 0, dim)
        self._tail_s = torch.zeros(bsz, n_kv, 0, dtype=torch.float32, device=keys.device)
        self.compressed = True

    def _merge(self) -> None:
        """Move the tail into the blocks; every (row, head) over its budget keeps its best ``budget`` tokens."""
        bsz, n_kv = self._tail_k.shape[:2]
        segs = bsz * n_kv
        seg, src, pos, score = self._entries()
        budget = self.params.budget(self.real_seen).view(-1)  # [S]
        lengths = torch.bincount(seg, minlength=segs)
        if bool((lengths > budget).any()):
            recent = pos >= self.seen - self.params.window
            order = torch.argsort(_segment_best_first(seg, torch.where(recent, POS_INF, score)), stable=True)
            by_seg = take(seg, order)
            rank = torch.arange(seg.numel(), device=seg.device) - take(_exclusive_cumsum(lengths), by_seg)
            keep = torch.zeros(seg.numel(), dtype=torch.bool, device=seg.device)
            kept = keep.index_fill_(0, order[rank < take(budget, by_seg)], True).nonzero()[:, 0]  # (segment, position)
            seg, src, pos, score = take(seg, kept), take(src, kept), take(pos, kept), take(score, kept)
        keys = self._gather(src, self.body.keys, self.tail_keys)
        values = self._gather(src, self.body.values, self.tail_values)
        self.body.pack(seg, keys, values, pos, score, segs)
        self.n_tail = 0
        self.tail_start = self.seen
        # fresh empty tensors: a view of the old tail would keep its storage alive
        self._tail_k = self._tail_k.new_zeros(bsz, n_kv, 0, self._tail_k.shape[-1])
        self._tail_v = self._tail_v.new_zeros(bsz, n_kv, 0, self._tail_v.shape[-1])
        self._tail_s = self._tail_s.new_zeros(bsz, n_kv, 0)



# ----------------------------------------------------------------------------------------------------------
# The registration: plan schema, parameters, runtime hook
# ----------------------------------------------------------------------------------------------------------


def _check_head_keep(values: torch.Tensor, context: TensorContext) -> str | None:
    """Shares in [0, 1], every layer's row summing to 1; a layer budget must come with them."""
    if bool(((values < 0) | (values > 1)).any()):
        return "every share must be in [0, 1] (values must be >= 0)"
    sums = values.double().sum(dim=1)
    bad = (sums - 1).abs() > SHARE_TOLERANCE
    if bool(bad.any()):
        layer = int(bad.nonzero()[0, 0])
        return (f"each layer's shares must sum to 1 (layer {layer} sums to {float(sums[layer]):.6g}); a head's budget "
                "is its share x H_kv x the layer's keep fraction")
    if "pyramidinfer.layer_keep" not in context.tensors and "kvcompress.layer_keep" not in context.tensors:
        return "needs the layers' budgets: pyramidinfer.layer_keep, or kvcompress.layer_keep without PyramidInfer"
    return None


def _check_layer_keep(values: torch.Tensor, context: TensorContext) -> str | None:
    if "pyramidinfer.layer_keep" in context.tensors:
        return "must not be given next to pyramidinfer.layer_keep (that one holds the layers' budgets)"
    if bool(((values <= 0) | (values > 1)).any()):
        return "every value must be in (0, 1]"
    return None


def _check_curve(values: torch.Tensor, context: TensorContext) -> str | None:
    if values.shape[-1] < 2:
        return "needs at least 2 grid points (keep fractions 0 and 1)"
    if bool((values < -1e-4).any()) or bool((values > 1 + 1e-4).any()):
        return "values must be in [0, 1] (fractions of attention mass)"
    if bool((values[..., 1:] < values[..., :-1] - 1e-4).any()):
        return "each head's curve must be non-decreasing along the grid"
    return None


def _check_mass(values: torch.Tensor, context: TensorContext) -> str | None:
    if bool((values < -1e-4).any()) or bool((values > 1 + 1e-4).any()):
        return "values must be in [0, 1] (a fraction of attention mass)"
    return None


def head_fractions(plan, layer: int) -> tuple[float, ...]:
    """``f_lh`` of every KV head of ``layer``: ``min(1, head_keep[l, h] * H_kv * layer_keep[l])`` (1 within 1e-5)."""
    shares = plan.tensors["kvcompress.head_keep"][layer].double()
    keep_tensor = plan.tensors.get("pyramidinfer.layer_keep")
    if keep_tensor is None:
        keep_tensor = plan.tensors["kvcompress.layer_keep"]
    keep = float(keep_tensor[layer])
    # float32 shares round-trip: a fraction within 1e-5 of 1 is the whole context
    return tuple(1.0 if s >= 1.0 - 1e-5 else float(s) for s in (shares * shares.numel() * keep).tolist())


def configure(plan, layers: list[LayerPlan], config) -> None:
    """Give every full-attention layer whose heads get different shares its per-head budgets (a layer with equal
    shares in a plan with PyramidInfer stays a PyramidInfer layer; sliding-window layers keep their window)."""
    args = METHOD.read_params(plan.params.get("kvcompress", {}))
    shares = plan.tensors["kvcompress.head_keep"]
    with_pyramid = "pyramidinfer.layer_keep" in plan.tensors
    for layer in layers:
        if layer.kind != "full_attention":
            continue
        row = shares[layer.index]
        if with_pyramid and float(row.max() - row.min()) <= 1e-6:
            continue
        fractions = head_fractions(plan, layer.index)
        if min(fractions) >= 1.0:
            layer.selection = None
            continue
        layer.selection = HeadParams(fractions=fractions, **args)


METHOD = MethodSpec(
    name="kvcompress",
    description="KV-Compress: each KV head keeps its own calibrated share of the layer's token budget (ragged "
    "per-head storage, squared-attention scores)",
    tensors=(
        TensorSpec("kvcompress.head_keep", torch.float32, ("L", "H_kv"), _check_head_keep,
                   "per-KV-head share of the layer budget (rows sum to 1)"),
        TensorSpec("kvcompress.layer_keep", torch.float32, ("L",), _check_layer_keep,
                   "per-layer keep fraction when the plan has no PyramidInfer", required=False),
        TensorSpec("kvcompress.captured_curve", torch.float32, ("L", "H_kv", "*"), _check_curve,
                   "calibration: attention mass a head's future queries find at keep fractions 0..1 (grid)",
                   required=False),
        TensorSpec("kvcompress.captured_mass", torch.float32, ("L", "H_kv"), _check_mass,
                   "calibration: attention mass each head captures at its chosen fraction", required=False),
    ),
    params=(
        ParamSpec("window", "int", 32, "recent tokens every head keeps; also the number of last prefill queries that "
                  "score the context", minimum=1, in_plan="always"),
        ParamSpec("sink", "int", 4, "first tokens every head keeps (attention sinks)", minimum=0, in_plan="always"),
        ParamSpec("pool", "int", 1, "max-pooling width of the prefill scores along the sequence (1 = none; "
                  "KV-Compress's paper uses 7)", minimum=1),
        ParamSpec("metric", "str", "l2", "score of a token: squared (l2) or plain (l1) attention probabilities",
                  choices=("l2", "l1")),
        ParamSpec("block", "int", 8, "tokens per storage block of one (row, KV head)", minimum=1, maximum=4096),
        ParamSpec("slack", "int", 8, "decode tokens held densely before they are merged into the blocks and "
                  "heads over budget evict", minimum=1, maximum=4096),
        ParamSpec("horizon", "int", 64, "calibration: queries after each cut point whose attention measures what a "
                  "head's budget captures", minimum=1, stage="calibration"),
        ParamSpec("probes", "int", 16, "calibration: built-in retrieval probes (a key-value fact in the calibration "
                  "text, asked for at the end)", minimum=0, stage="calibration"),
        ParamSpec("probe_weight", "float", 16.0, "calibration: weight of the retrieval probes' curves against the "
                  "text's", minimum=0.0, stage="calibration"),
        ParamSpec("allocation", "str", "retrieval", "calibration: 'retrieval' (heads the greedy gives the whole "
                  "context keep it, the others share the rest evenly) or 'greedy' (every head's fraction from the "
                  "greedy)", choices=("retrieval", "greedy"), stage="calibration"),
    ),
    configure=configure,
    calibration_step="calibrate.kvcompress:calibration_step",
    calibration_order=2,
    card_column=("head keep (min–max)", "kvcompress.head_keep", lambda row: f"{min(row):.3f}–{max(row):.3f}"),
)

__all__ = ["HeadParams", "METHOD", "RaggedLayer", "RaggedStorage", "head_fractions", "kvc_scores", "ragged_attend"]
