"""PyramidInfer at run time: a cache layer that keeps a calibrated fraction of the context.

Each layer of a PyramidInfer plan keeps ``layer_keep[l]`` of the tokens it has seen. Which tokens is decided per
request from attention: after prefill the last ``window`` queries score every context token (mean attention
probability over query heads and window queries), the ``sink`` first tokens and the last ``window`` tokens are
always kept, and the best-scored rest fills the budget. While decoding, every new query's attention is folded into
the scores (an exponential moving average over about ``window`` steps) and, once the layer holds ``slack`` tokens
more than the budget of the current length, it is compacted back to that budget. Kept tokens keep their original
positions (keys are cached after RoPE); dropped tokens are physically freed.

Unlike the official code, the prompt is never re-compressed below the budget of the current length (the budget
grows with the sequence), sinks stay protected while decoding, and no attention rows are kept outside the cache:
the only per-token state beside K/V is an int32 position and a float32 score.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from packaging.version import Version
from transformers.cache_utils import DynamicLayer

from .kcache import ValueStore, check_estimator, top_slots
from .layers import CompressingLayer, Held, LayerPlan, RowSelection, cat_rows, check_same, key_valid_from_mask, tensor_bytes
from .schema import MethodSpec, ParamSpec, TensorContext, TensorSpec

NEG_INF = float("-inf")
POS_INF = float("inf")


@dataclass(frozen=True)
class PyramidParams:
    """Per-layer PyramidInfer settings taken from a plan (defaults: :data:`METHOD`'s parameters).

    Attributes:
        keep: fraction of the seen tokens this layer keeps, in (0, 1].
        window: recent tokens always kept; also the number of last queries that score the context.
        sink: first (non-padding) tokens always kept.
        slack: tokens the layer may hold above its budget before it compacts while decoding
            (``None``: ``max(4, budget // 64)``).
        pool: width of the average pooling applied to the prefill scores along the sequence (1 = none), so that
            neighbours of a strongly attended token are kept with it.
        head_reduce: how the query heads' attention is combined into one score per token (``mean`` or ``max``).
    """

    keep: float
    window: int
    sink: int
    slack: int | None
    pool: int
    head_reduce: str
    per_kv_head: bool = False

    @property
    def selection_heads(self) -> int | None:
        """``H_s``: 1 when every KV head keeps the same tokens, None for one selection per KV head."""
        return None if self.per_kv_head else 1

    def budget(self, seen: torch.Tensor) -> torch.Tensor:
        """Tokens to keep for (rows, heads) that have seen ``seen`` real tokens (int64, any shape)."""
        want = torch.ceil(seen.to(torch.float64) * self.keep).to(torch.int64)
        floor = torch.clamp(seen, max=self.sink + self.window)
        return torch.minimum(torch.maximum(want, floor), seen)

    def theoretical_tokens(self, seen: int) -> float:
        """Tokens held per KV head after ``seen`` real tokens (for memory accounting)."""
        return float(theoretical_kept(seen, self))

    def make_layer(self, readers: int = 0, topn: int = 0, estimator: str = "residual_mean") -> "BudgetedLayer":
        return BudgetedLayer(self, readers=readers, topn=topn, estimator=estimator)

    def slack_for(self, budget):
        """Tokens allowed above ``budget`` (an int, or an int64 tensor of per-row budgets) before compacting."""
        if isinstance(budget, torch.Tensor):
            return torch.full_like(budget, self.slack) if self.slack is not None else (budget // 64).clamp(min=4)
        return self.slack if self.slack is not None else max(4, budget // 64)


def window_scores(
    query: torch.Tensor,
    keys: torch.Tensor,
    key_valid: torch.Tensor,
    scaling: float,
    window: int,
    pool: int = 1,
    head_reduce: str = "mean",
    per_kv_head: bool = False,
) -> torch.Tensor:
    """Mean attention probability that the last ``window`` real queries give each key.

    Args:
        query: ``[B, H_q, Q, d]`` queries of the chunk just processed (post-RoPE); the last ``window`` are used.
        keys: ``[B, H_kv, T, d]`` keys the layer holds; the last ``Q`` of them belong to ``query``'s tokens.
        key_valid: bool ``[B, T]``, False for padding.
        scaling: softmax scale of the layer.
        window: number of last queries that vote.
        pool: average-pooling width along the sequence applied to the result (1 = none; padding counts as 0,
            so a row of a padded batch scores exactly as it does alone).
        head_reduce: ``mean`` or ``max`` over query heads.
        per_kv_head: reduce over each KV head's group of query heads (GQA) instead of over all query heads.

    Returns:
        float32 ``[B, H_s, T]`` (``H_s`` = ``H_kv`` with ``per_kv_head``, else 1): over the real window queries, the
        mean of their attention probabilities reduced over query heads (causal within the window; padding gets 0).
        Rows whose logits together exceed :data:`QUERY_BLOCK_BYTES` are scored one at a time (a batch prefill then
        holds one row's window logits, not the batch's).
    """
    bsz, n_q_heads, q_len, dim = query.shape
    n_kv = keys.shape[1]
    total = keys.shape[2]
    w = min(window, q_len)
    if bsz > 1 and 4 * bsz * n_q_heads * w * total > QUERY_BLOCK_BYTES:  # rows are independent: one at a time
        return torch.cat([window_scores(query[i : i + 1], keys[i : i + 1], key_valid[i : i + 1], scaling, window, pool,
                                        head_reduce, per_kv_head) for i in range(bsz)])
    groups = n_q_heads // n_kv
    q = query[:, :, -w:, :].float().reshape(bsz, n_kv, groups * w, dim)
    logits = torch.matmul(q, keys.float().transpose(-1, -2)) * scaling  # [B, H_kv, G*w, T]
    logits = logits.view(bsz, n_kv, groups, w, total)
    q_pos = torch.arange(total - w, total, device=keys.device)
    k_pos = torch.arange(total, device=keys.device)
    allowed = (k_pos[None, :] <= q_pos[:, None])[None] & key_valid[:, None, :]  # [B, w, T]
    logits = logits.masked_fill_(~allowed[:, None, None], NEG_INF)
    probs = torch.softmax(logits, dim=-1).nan_to_num_(0.0)  # rows of padding queries are all -inf
    per_query = reduce_heads(probs, head_reduce, per_kv_head)  # [B, H_s, w, T]
    real_q = key_valid[:, None, -w:, None]  # a window query is real when its own token is
    n_real = key_valid[:, -w:].sum(dim=1)[:, None, None].clamp(min=1)
    scores = (per_query * real_q).sum(dim=2) / n_real  # [B, H_s, T]
    if pool > 1:
        flat = scores.reshape(-1, 1, total)
        pooled = torch.nn.functional.avg_pool1d(flat, pool, stride=1, padding=pool // 2)[:, 0, :total]
        scores = pooled.view(bsz, -1, total) * key_valid[:, None, :]
    return scores


def reduce_heads(probs: torch.Tensor, how: str, per_kv_head: bool = False) -> torch.Tensor:
    """``[B, H_kv, G, Q, T]`` probabilities → ``[B, H_s, Q, T]`` by ``mean`` or ``max`` over the query heads of
    each KV head's group (``per_kv_head``: ``H_s = H_kv``) or over all query heads (``H_s = 1``)."""
    dims = (2,) if per_kv_head else (1, 2)
    if how == "max":
        out = probs.amax(dim=dims)
    elif how == "mean":
        out = probs.mean(dim=dims)
    else:
        raise ValueError(f"head_reduce must be 'mean' or 'max', not {how!r}")
    return out if per_kv_head else out.unsqueeze(1)


#: Chunks of at most this many queries fold their attention into the scores query by query; longer ones (chunked
#: prefill) in one closed-form weighted sum (the same average up to float rounding).
FOLD_LOOP_MAX = 64


def fold_weights(q_len: int, window: int, device=None) -> torch.Tensor:
    """float32 ``[Q]``: the weight ``(1 - gamma) gamma^(Q - 1 - i)`` of query ``i`` of a chunk in the moving average
    of its attention (``gamma = 1 - 1 / window``), computed in float64."""
    gamma = 1.0 - 1.0 / max(window, 1)
    ages = torch.arange(q_len - 1, -1, -1, dtype=torch.float64, device=device)
    return ((1.0 - gamma) * torch.pow(gamma, ages)).float()


#: Bytes of float32 logits one block of queries of a multi-token chunk may take in :func:`attend` (and
#: ``runtime.kvcompress.ragged_attend``): a long chunk (chunked prefill) is attended block by block, so its transient
#: memory does not grow with chunk length × what the layer holds. Each query's output is computed the same way.
QUERY_BLOCK_BYTES = 16 * 2**20


def query_block(queries_per_token: int, keys: int) -> int:
    """Queries of a chunk attended together: as many as keep ``queries_per_token × keys`` float32 logits per query
    within :data:`QUERY_BLOCK_BYTES` (at least 1)."""
    return max(1, QUERY_BLOCK_BYTES // max(1, 4 * queries_per_token * keys))


class ChunkMask:
    """The bool mask ``[B, H_s, Q, T]`` of a chunk of ``Q`` queries over the ``T`` slots a layer holds (its last ``Q``
    slots are the chunk's own tokens), built one block of queries at a time (:meth:`rows`): a chunk of a chunked
    prefill never holds its whole ``Q x T`` rectangle (19 MB for 4,096 queries over 4,600 slots, twice that while it
    is assembled).

    Args:
        old: bool ``[B, H_s, T - Q]``: the real tokens held before the chunk (every query may attend to them).
        new: bool ``[B|1, 1, Q, Q]``: the forward's mask over the chunk's own tokens, or None (causal, no padding).
    """

    def __init__(self, old: torch.Tensor, new: torch.Tensor | None, q_len: int):
        self.old, self.new, self.q_len = old, new, q_len

    @property
    def shape(self) -> tuple[int, int, int, int]:
        bsz, heads, held = self.old.shape
        return bsz, heads, self.q_len, held + self.q_len

    def rows(self, start: int, end: int) -> torch.Tensor:
        """bool ``[B, H_s, end - start, T]``: the mask of queries ``start..end-1``."""
        bsz, heads, held = self.old.shape
        end = min(end, self.q_len)
        count = end - start
        if self.new is None:  # query start + i sees the chunk's tokens 0 .. start + i
            own = torch.ones(count, self.q_len, dtype=torch.bool, device=self.old.device).tril(diagonal=start)
        else:
            own = self.new[:, :, start:end]
        return torch.cat([self.old[:, :, None, :].expand(bsz, heads, count, held),
                          own.expand(bsz, heads, count, self.q_len)], dim=-1)

    def own(self) -> torch.Tensor:
        """bool ``[B, H_s, Q]``: may each query attend to its own token (is it real)."""
        bsz, heads = self.old.shape[:2]
        if self.new is None:
            return torch.ones(bsz, heads, self.q_len, dtype=torch.bool, device=self.old.device)
        steps = torch.arange(self.q_len, device=self.new.device)
        return self.new[:, :, steps, steps].expand(bsz, heads, self.q_len)


def attend(
    query: torch.Tensor,
    keys: torch.Tensor,
    values,
    allowed: torch.Tensor,
    scaling: float,
    head_reduce: str = "mean",
    per_kv_head: bool = False,
    topn: int = 0,
    estimator: str = "residual_mean",
    fold: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_attend` (its doc) over blocks of the chunk's queries (:func:`query_block`); one block for a decode
    step or a short chunk. ``allowed`` may be a :class:`ChunkMask` (built block by block) instead of the bool
    tensor.

    ``fold``: float32 ``[Q]`` weights, or None. Given, the second output is not the probabilities ``[B, H_s, Q, T]``
    but their weighted sum over the chunk's queries, ``sum_q fold[q] * probs[:, :, q]`` ``[B, H_s, T]``, summed block
    by block: a long chunk then never holds the probabilities of all its queries (``Q x T`` floats per selection
    head, 75 MB for 4,096 queries over 4,600 slots).
    """
    bsz, n_q_heads, q_len, dim = query.shape
    step = query_block(bsz * n_q_heads, keys.shape[2])

    def block(start: int, end: int) -> torch.Tensor:
        return allowed.rows(start, end) if isinstance(allowed, ChunkMask) else allowed[:, :, start:end]

    if q_len <= step:
        out, probs = _attend(query, keys, values, block(0, q_len), scaling, head_reduce, per_kv_head, topn, estimator,
                             q_len == 1)
        return out, probs if fold is None else torch.matmul(fold, probs)
    if (fold is not None and not isinstance(values, ValueStore) and allowed.shape[1] == 1
            and fused_chunk_attention(query.device)):
        return _attend_fused(query, keys, values, block, scaling, head_reduce, per_kv_head, fold, step)
    out = query.new_empty(bsz, q_len, n_q_heads, dim)
    probs, folded = [], None
    for start in range(0, q_len, step):
        part, prob = _attend(query[:, :, start : start + step], keys, values, block(start, start + step),
                             scaling, head_reduce, per_kv_head, topn, estimator, False)
        out[:, start : start + step] = part
        if fold is None:
            probs.append(prob)
        else:
            prob = torch.matmul(fold[start : start + step], prob)
            folded = prob if folded is None else folded.add_(prob)
    return out, torch.cat(probs, dim=2) if fold is None else folded


def _softmax_probs(query: torch.Tensor, keys: torch.Tensor, allowed: torch.Tensor, scaling: float) -> torch.Tensor:
    """float32 ``[B, H_kv, G, Q, T]``: the attention probabilities of ``query [B, H_q, Q, d]`` over ``keys
    [B, H_kv, T, d]`` where ``allowed`` (bool ``[B, H_s, Q, T]``) lets it attend; 0 for a query that may attend to
    nothing (a padding query)."""
    bsz, n_q_heads, q_len, dim = query.shape
    n_kv, total = keys.shape[1], keys.shape[2]
    groups = n_q_heads // n_kv
    q = query.reshape(bsz, n_kv, groups * q_len, dim)
    logits = torch.matmul(q, keys.transpose(-1, -2)).float() * scaling  # [B, H_kv, G*Q, T]
    logits = logits.view(bsz, n_kv, groups, q_len, total).masked_fill_(~allowed[:, :, None], NEG_INF)
    return torch.softmax(logits, dim=-1).nan_to_num_(0.0)


#: torch's SDPA takes ``enable_gqa`` (grouped-query heads without copying K/V) from 2.5 on.
SDPA_GQA = Version(torch.__version__).release >= (2, 5)

#: A long chunk scored with the fused kernel (:func:`fused_chunk_attention`) scores only its queries whose weight in
#: the scores' moving average is at least this fraction of the newest query's: the ones left out weigh less than
#: ``2^-30`` together (geometric weights), so a token's score changes by less than 1e-9.
FOLD_HORIZON = 2.0**-30


def fused_chunk_attention(device: torch.device) -> bool:
    """Whether a long chunk of a chunked prefill takes its output from the fused SDPA kernel (with the chunk's mask,
    one call) and scores only the queries that weigh in the scores (:data:`FOLD_HORIZON`), instead of attending in
    blocks of plain attention that also give every query's probabilities: on accelerators, where the blocks cost a
    kernel launch per operation and the memory-efficient kernel holds no ``Q x T`` probabilities. On a CPU the plain
    blocks keep the transient memory within :data:`QUERY_BLOCK_BYTES` (the fused CPU kernel's buffers are larger)."""
    return device.type != "cpu"


def _attend_fused(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, block, scaling: float, head_reduce: str,
    per_kv_head: bool, fold: torch.Tensor, step: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`attend` of a long chunk with ``fold`` weights, output by SDPA (see :func:`fused_chunk_attention`);
    ``block(start, end)``: the mask of queries ``start..end-1`` (:func:`attend`'s)."""
    n_q_heads, q_len = query.shape[1], query.shape[2]
    n_kv = keys.shape[1]
    if n_q_heads != n_kv and not SDPA_GQA:
        keys_q = keys.repeat_interleave(n_q_heads // n_kv, dim=1)
        values_q = values.repeat_interleave(n_q_heads // n_kv, dim=1)
        gqa = {}
    else:
        keys_q, values_q, gqa = keys, values, ({"enable_gqa": True} if n_q_heads != n_kv else {})
    out = torch.nn.functional.scaled_dot_product_attention(query, keys_q, values_q, attn_mask=block(0, q_len),
                                                           scale=scaling, **gqa)
    out = out.nan_to_num_(0.0).transpose(1, 2).contiguous()  # a padding query attends to nothing: 0, as in _attend
    first = int((fold < fold[-1] * FOLD_HORIZON).sum())  # the weights grow with the query index
    folded = None
    for start in range(first, q_len, step):
        end = min(start + step, q_len)
        prob = reduce_heads(_softmax_probs(query[:, :, start:end], keys, block(start, end), scaling), head_reduce,
                            per_kv_head)
        part = torch.matmul(fold[start:end], prob)
        folded = part if folded is None else folded.add_(part)
    return out, folded


def _attend(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    allowed: torch.Tensor,
    scaling: float,
    head_reduce: str = "mean",
    per_kv_head: bool = False,
    topn: int = 0,
    estimator: str = "residual_mean",
    decode: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain attention over what a layer holds, returning the output and the head-reduced probabilities.

    Args:
        query: ``[B, H_q, Q, d]``; keys/values: ``[B, H_kv, T, d]`` (grouped-query heads are not copied).
            ``values`` may instead be the layer's KCache :class:`ValueStore`: a single query per row then reads only
            the ``topn`` rows per (row, KV head) it attends to most (``ValueStore.topn_output``, with ``estimator``),
            a longer chunk reads them all (``decode``: False for a block of a longer chunk, which reads them all
            whatever its length).
        allowed: bool ``[B, H_s, Q, T]`` (``H_s`` 1 or ``H_kv``).

    Returns:
        output ``[B, Q, H_q, d]`` (the layout transformers' attention functions return) and float32
        ``[B, H_s, Q, T]`` probabilities reduced over query heads (``head_reduce``, per KV head or over all).
    """
    bsz, n_q_heads, q_len, dim = query.shape
    n_kv, total = keys.shape[1], keys.shape[2]
    groups = n_q_heads // n_kv
    probs = _softmax_probs(query, keys, allowed, scaling)
    flat = probs.view(bsz, n_kv, groups * q_len, total)
    if isinstance(values, ValueStore):
        count = allowed[:, :, -1].sum(dim=-1) if estimator == "residual_mean" else None  # [B, H_s] real tokens
        out = values.topn_output(flat, topn if q_len == 1 and decode else total, count).to(query.dtype)
    else:
        out = torch.matmul(flat.to(values.dtype), values)
    out = out.view(bsz, n_q_heads, q_len, dim).transpose(1, 2).contiguous()
    return out, reduce_heads(probs, head_reduce, per_kv_head)


def attend_step(
    query: torch.Tensor,
    keys: torch.Tensor,
    values,
    bias: torch.Tensor,
    scaling: float,
    head_reduce: str = "mean",
    per_kv_head: bool = False,
    topn: int = 0,
    estimator: str = "residual_mean",
    guard: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_attend` for one decode step (one query per row), with the mask given as an additive bias.

    Args:
        query: ``[B, H_q, 1, d]``; keys: ``[B, H_kv, T, d]``; values: ``[B, H_kv, T, d]`` or the layer's KCache
            :class:`ValueStore` (reads ``topn`` rows per (row, KV head), as in :func:`_attend`).
        bias: float32 ``[B, H_s, 1, T]``: 0 where the query may attend, ``-inf`` elsewhere.
        guard: whether a (row, head) may have nothing to attend to (a padded batch): its probabilities are then 0,
            not NaN.

    Returns:
        output ``[B, 1, H_q, d]`` and float32 ``[B, H_s, 1, T]`` probabilities reduced over query heads.
    """
    bsz, n_q_heads, _, dim = query.shape
    n_kv, total = keys.shape[1], keys.shape[2]
    groups = n_q_heads // n_kv
    logits = torch.matmul(query.reshape(bsz, n_kv, groups, dim), keys.transpose(-1, -2))  # [B, H_kv, G, T]
    probs = torch.softmax(torch.add(bias, logits, alpha=scaling), dim=-1)  # float32 (the bias is)
    if guard:
        probs = probs.nan_to_num_(0.0)
    if isinstance(values, ValueStore):
        count = None
        if estimator == "residual_mean" and topn < total:
            count = (bias[:, :, 0] == 0).sum(dim=-1)  # [B, H_s] real tokens
        out = values.topn_output(probs, topn, count).to(query.dtype)
    else:
        out = torch.matmul(probs.to(values.dtype), values)
    dims = (2,) if per_kv_head else (1, 2)
    reduced = probs.amax(dim=dims) if head_reduce == "max" else probs.mean(dim=dims)
    reduced = reduced[:, :, None, :] if per_kv_head else reduced[:, None, None, :]
    return out.view(bsz, 1, n_q_heads, dim), reduced


def take_rows(buffer: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Slots ``idx`` int64 ``[B, H_s, W]`` (``H_s`` 1 or ``H``) of a contiguous ``[B, H, C, d]`` buffer, as a new
    ``[B, H, W, d]``: one ``index_select`` of whole ``d``-rows (a row copy each, where ``gather`` would index every
    element). ``rows``: :func:`row_index` of ``idx`` for this buffer's shape, when the caller has it."""
    if not buffer.is_contiguous():
        buffer = buffer.contiguous()
    bsz, heads, capacity, dim = buffer.shape
    if rows is None:
        rows = row_index(idx, bsz, heads, capacity)
    return buffer.view(-1, dim).index_select(0, rows).view(bsz, heads, idx.shape[-1], dim)


def row_index(idx: torch.Tensor, bsz: int, heads: int, capacity: int) -> torch.Tensor:
    """int64 ``[B * H * W]``: the rows of a flat ``[B * H * C, d]`` view that slots ``idx`` ``[B, H_s, W]`` name."""
    width = idx.shape[-1]
    base = torch.arange(0, bsz * heads * capacity, capacity, device=idx.device).view(bsz, heads, 1)
    return (idx.expand(bsz, heads, width) + base).reshape(-1)


class DenseStorage:
    """K/V of a layer as one rectangle per batch row, with per-slot bookkeeping for a selection.

    Holds ``keys``/``values`` ``[B, H_kv, T, d]``, ``positions`` int32 ``[B, H_s, T]`` (index of each slot's token in
    the full sequence) and ``scores`` float32 ``[B, H_s, T]`` (attention received; ``-inf`` marks an empty slot —
    padding, or a slot a narrower row or head left empty —, ``+inf`` a sink). ``H_s`` is 1 when every KV head keeps
    the same tokens; with ``H_s = H_kv`` each head keeps its own, and the rectangle is as wide as the widest head.

    The four tensors are views of the first ``T`` slots of buffers with room for ``capacity`` slots: a decode step
    writes its token in place (no copy of what is held), and a buffer grows — by :attr:`reserve` slots beyond what
    is needed — only when it is full. The layer sets :attr:`reserve` to the decode steps it expects before its next
    compaction, so that one allocation lasts a compaction cycle. ``physical_bytes`` counts the whole buffers.
    """

    def __init__(self, selection_heads: int | None):
        self.selection_heads = selection_heads  # 1, or None for one selection per KV head
        self._k: torch.Tensor | None = None  # buffers [B, H_kv | H_s, capacity(, d)]; the first ``width`` slots used
        self._v: torch.Tensor | None = None  # None once the values moved to ``store``
        self._pos: torch.Tensor | None = None
        self._sc: torch.Tensor | None = None
        self.width = 0
        self.reserve = 0  # slots added beyond the need when a buffer grows
        self.store: ValueStore | None = None  # KCache: where the values live after :meth:`offload`

    # ----- views of the used slots -------------------------------------------------------------------------------
    @property
    def keys(self) -> torch.Tensor | None:
        return None if self._k is None else self._k[:, :, : self.width]

    @property
    def values(self) -> torch.Tensor | None:
        return None if self._v is None else self._v[:, :, : self.width]

    @property
    def positions(self) -> torch.Tensor | None:
        return None if self._pos is None else self._pos[..., : self.width]

    @property
    def scores(self) -> torch.Tensor | None:
        return None if self._sc is None else self._sc[..., : self.width]

    @scores.setter
    def scores(self, scores: torch.Tensor) -> None:
        """Replace the used slots' scores (same width)."""
        if self._sc.shape[-1] == self.width:
            self._sc = scores
        else:
            self._sc[..., : self.width] = scores

    @property
    def capacity(self) -> int:
        return 0 if self._k is None else self._k.shape[2]

    @property
    def offloaded(self) -> bool:
        return self.store is not None and self._v is None and self._k is not None

    def offload(self, store: ValueStore) -> None:
        """KCache: move the values to ``store`` (same layout ``[B, H_kv, T, d]``; empty slots zeroed); the
        model-side copy is freed."""
        store.put(self.values.contiguous() if self.capacity != self.width else self._v, valid=self.valid())
        self.store, self._v = store, None

    def attention_values(self):
        """What attention reads the values from: the tensor, or the KCache store."""
        return self.store if self.offloaded else self.values

    def values_on_model(self) -> torch.Tensor:
        return self.store.to_model(self.store.view()) if self.offloaded else self.values

    def append(self, key_states: torch.Tensor, value_states: torch.Tensor, first_position: int) -> None:
        """Append a chunk ``[B, H_kv, Q, d]``; its slots get positions ``first_position ..`` and score 0."""
        bsz, n_kv, q_len, _ = key_states.shape
        heads = self.selection_heads or n_kv
        device = key_states.device
        if self._k is None:
            new_pos = torch.arange(first_position, first_position + q_len, device=device, dtype=torch.int32)
            self._pos = new_pos.expand(bsz, heads, q_len).contiguous()
            self._sc = torch.zeros((bsz, heads, q_len), dtype=torch.float32, device=device)
            # a copy, as DynamicLayer's cat makes: the model's tensor may be a view of a larger (fused) buffer
            self._k = key_states.clone(memory_format=torch.contiguous_format)
            self._v = value_states.clone(memory_format=torch.contiguous_format)
            self.width = q_len
            return
        start, end = self.width, self.width + q_len
        if end > self.capacity:
            self._grow(end + self.reserve)
        self._k[:, :, start:end] = key_states
        if self.offloaded:
            self.store.append(value_states)
        else:
            self._v[:, :, start:end] = value_states
        if q_len == 1:
            self._pos[:, :, start].fill_(first_position)
        else:
            self._pos[:, :, start:end] = torch.arange(first_position, first_position + q_len, device=device,
                                                      dtype=torch.int32)
        self._sc[:, :, start:end] = 0.0
        self.width = end

    def _grow(self, capacity: int) -> None:
        """Move the used slots into buffers of ``capacity`` slots."""
        width = self.width

        def grown(buffer: torch.Tensor, token_dim: int) -> torch.Tensor:
            shape = list(buffer.shape)
            shape[token_dim] = capacity
            out = buffer.new_empty(shape)
            out.narrow(token_dim, 0, width).copy_(buffer.narrow(token_dim, 0, width))
            return out

        self._k = grown(self._k, 2)
        if self._v is not None:
            self._v = grown(self._v, 2)
        self._pos = grown(self._pos, 2)
        self._sc = grown(self._sc, 2)

    def valid(self) -> torch.Tensor:
        """bool ``[B, H_s, T]``: slots holding a real token."""
        return self.scores > NEG_INF

    def gather(self, idx: torch.Tensor, kept: torch.Tensor | None, reserve: int = 0) -> None:
        """Keep slots ``idx`` int64 ``[B, H_s, W]`` (ascending); slots where ``kept`` is False become empty (None: all
        kept). The new buffers have room for ``reserve`` more slots."""
        width = idx.shape[-1]
        picks = idx
        if reserve and not self._k.requires_grad:
            # the reserve slots pick slot 0 too: each new buffer is one gather, its room filled with a copy (unused)
            picks = torch.nn.functional.pad(idx, (0, reserve))
        shape = self._k.shape  # take_rows makes a buffer contiguous first; the shape is the same
        rows = row_index(picks, shape[0], shape[1], shape[2])
        self._k = take_rows(self._k, picks, rows)
        if self._v is not None:
            self._v = take_rows(self._v, picks, rows if self._v.shape == shape else None)
        self._pos = self._pos.gather(-1, picks)
        self._sc = self._sc.gather(-1, picks)
        self.width = width
        if kept is not None:
            self.scores.masked_fill_(~kept, NEG_INF)
        if self.offloaded:
            self.store.put(take_rows(self.store.buffer, idx.to(self.store.device)), valid=self.valid())

    def select_rows(self, fn) -> None:
        if self.offloaded:
            self.store.select_rows(fn)
        width = self.width
        for name in ("_k", "_v", "_pos", "_sc"):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, fn(tensor.narrow(2, 0, width)))

    def join_rows(self, others: list[DenseStorage]) -> None:
        """The rows of ``others`` after this storage's (``BudgetedLayer.join_rows``). The rectangle becomes as wide as
        the widest part; a narrower part's rows get empty slots (zero K/V, position 0, score ``-inf``) *before* their
        own, as a narrower row of one batch has its holes before its newest tokens: the last slots of every row keep
        its most recent tokens (the recent window a compaction protects is the rectangle's last slots). Buffers get
        :attr:`reserve` more slots."""
        parts = [self, *others]
        check_same(parts, "selection_heads", "offloaded")
        if all(part._k is None for part in parts):
            return
        width = max(part.width for part in parts)
        rows = sum(part._k.shape[0] for part in parts)

        def joined(name: str, fill: float) -> torch.Tensor | None:
            used = [None if getattr(part, name) is None else getattr(part, name).narrow(2, 0, part.width)
                    for part in parts]
            if all(tensor is None for tensor in used):
                return None
            if any(tensor is None for tensor in used):
                raise ValueError("kvplan: cannot join the batch rows of cache layers where only some hold a tensor")
            shape = list(used[0].shape)
            shape[0], shape[2] = rows, width + self.reserve
            out = used[0].new_full(shape, fill)
            row = 0
            for tensor in used:
                out[row : row + tensor.shape[0], :, width - tensor.shape[2] : width] = tensor
                row += tensor.shape[0]
            return out

        self._k, self._v = joined("_k", 0.0), joined("_v", 0.0)
        self._pos, self._sc = joined("_pos", 0), joined("_sc", NEG_INF)
        self.width = width
        if self.offloaded:
            self.store.join_rows([part.store for part in others])  # right-aligned too
        for part in others:
            part.clear()

    def tensors(self) -> tuple:
        store = (*self.store.tensors(), *self.store.resident()) if self.offloaded else ()
        return (self._k, self._v, self._pos, self._sc, *store)

    def clear(self) -> None:
        self._k = self._v = self._pos = self._sc = None
        self.width = 0
        if self.store is not None:
            self.store.clear()
        self.store = None


class BudgetedLayer(RowSelection, CompressingLayer, DynamicLayer):
    """Cache layer that physically keeps a budget of the tokens it has seen (PyramidInfer).

    Storage: :class:`DenseStorage`. Selection: every (row, selection head) keeps ``params.budget(seen)`` of its real
    tokens, scored by the attention of recent queries (``window_scores`` at prefill, a moving average while
    decoding), sinks and the recent window protected. With ``params.per_kv_head`` each KV head scores and keeps its
    own tokens; otherwise every head of the layer keeps the same ones (PyramidInfer). ``get_seq_length()`` reports
    the tokens *seen*, so positions and masks stay those of the full sequence; ``kept_length()`` is the width held.
    """

    reads_own_columns_only = True  # later chunks: storage.valid() for held tokens, the mask's last Q columns

    def __init__(self, params: PyramidParams, readers: int = 0, topn: int = 0, estimator: str = "residual_mean"):
        super().__init__()
        check_estimator(estimator)
        self.params = params
        self.readers = readers  # KVSharer: later layers that attend over this layer's cache
        self.topn = int(topn)  # KCache: value rows a decode step reads per (row, KV head); 0 = values stay
        self.estimator = estimator
        self.storage = DenseStorage(params.selection_heads)
        self._pending: dict | None = None  # this step's votes while readers still have to attend
        self.seen = 0
        self.real_seen: torch.Tensor | None = None  # int64 [B, H_s]: non-padding tokens seen per row
        # int64 [B]: tokens seen when each row's first chunk with real tokens was compressed; later ones are young
        self.prefill_end: torch.Tensor | None = None
        self.compressed = False
        self._countdown = 0  # decode steps before the next compaction check (``_schedule``)
        self._maybe_empty = False  # some row holds no real token yet

    # ----- views of the storage (read-only names kept for callers and tests) ---------------------------------
    @property
    def positions(self) -> torch.Tensor | None:
        return self.storage.positions

    @property
    def scores(self) -> torch.Tensor | None:
        return self.storage.scores

    # ----- transformers' layer protocol -------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor, *args) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.storage.append(key_states, value_states, self.seen)
        self.keys, self.values = self.storage.keys, self.storage.values
        self.seen += key_states.shape[-2]
        return self.keys, self.values

    def reset(self) -> None:
        self.storage.clear()
        self.keys = self.values = None
        self.is_initialized = False
        self.seen = 0
        self.real_seen = None
        self.prefill_end = None
        self.compressed = False
        self._pending = None
        self._countdown = 0
        self._maybe_empty = False

    def crop(self, *args, **kwargs) -> None:
        raise NotImplementedError(
            "a PyramidInfer layer cannot be cropped (assisted/speculative decoding rolls back tokens it may have "
            "evicted); generate without an assistant model while a plan is applied"
        )

    def _select_rows(self, fn) -> None:
        self.storage.select_rows(fn)
        self.keys, self.values = self.storage.keys, self.storage.values
        if self.real_seen is not None:
            self.real_seen = fn(self.real_seen)
        if self.prefill_end is not None:
            self.prefill_end = fn(self.prefill_end)

    def join_rows(self, others: list) -> None:
        parts = [self, *others]
        check_same(parts, "is_initialized", "seen", "compressed", "readers", "topn")
        if any(part._pending is not None for part in parts):
            raise ValueError("kvplan: cannot join the batch rows of a layer in the middle of a forward")
        # the schedule of one batch: the first compaction check due in any row, a row still empty in any
        self._countdown = min(part._countdown for part in parts)
        self._maybe_empty = any(part._maybe_empty for part in parts)
        self.storage.reserve = max(self._countdown - 1, 0)
        self.storage.join_rows([part.storage for part in others])
        self.keys, self.values = self.storage.keys, self.storage.values
        self.real_seen = cat_rows([part.real_seen for part in parts])
        self.prefill_end = cat_rows([part.prefill_end for part in parts])

    # ----- the plan-layer interface -------------------------------------------------------------------------------
    def held(self) -> Held:
        if self.storage.keys is None:
            raise RuntimeError("kvplan: the layer has not cached anything yet")
        return Held(self.storage.keys, self.storage.values_on_model(), self.storage.positions, self.storage.valid())

    def holds_anything(self) -> bool:
        return self.storage.width > 0

    def kept_length(self) -> int:
        return self.storage.width

    def kept_lengths(self) -> torch.Tensor:
        if self.storage.keys is None:
            return torch.zeros(0, 0, dtype=torch.int64)
        n_kv = self.storage.keys.shape[1]
        return self.storage.valid().sum(dim=-1).expand(-1, n_kv).to(torch.int64)

    def physical_bytes(self, by_device: bool = False):
        return tensor_bytes((*self.storage.tensors(), self.real_seen), by_device)

    def value_stores(self) -> list:
        return [self.storage.store] if self.storage.offloaded else []

    # ----- attention ----------------------------------------------------------------------------------------------
    def attention(
        self, query: torch.Tensor, full_mask: torch.Tensor | None, scaling: float, exact
    ) -> torch.Tensor:
        """Attention of ``query`` (the chunk just appended) over what the layer holds, then compression.

        ``full_mask`` is the bool mask ``[B|1, 1, Q, seen]`` over the full sequence, or ``None`` when there is no
        padding. ``exact(keys, values)`` computes the exact (stock) output of the first chunk.
        Returns ``[B, Q, H_q, d]``. When other layers read this cache (KVSharer), compression waits until the
        last of them has attended (:meth:`reader_attention`), and their queries vote on what is kept.
        """
        p = self.params
        if not self.compressed:
            out = exact(self.storage.keys, self.storage.values)
            self._pending = {"prefill": True, "mask": full_mask, "votes": [self._prefill_scores(query, full_mask, scaling)]}
        elif query.shape[2] == 1 and not self._maybe_empty:
            bias = self._step_bias(full_mask)
            out, probs = attend_step(query, self.storage.keys, self.storage.attention_values(), bias, scaling,
                                     p.head_reduce, p.per_kv_head, self.topn, self.estimator, full_mask is not None)
            self._pending = {"prefill": False, "step": True, "bias": bias, "mask": full_mask, "votes": [probs]}
        else:
            allowed = self._allowed(full_mask, query.shape[2])
            fold = self._fold_weights(query.shape[2])
            out, probs = attend(query, self.storage.keys, self.storage.attention_values(), allowed, scaling,
                                p.head_reduce, p.per_kv_head, self.topn, self.estimator, fold)
            self._pending = {"prefill": False, "allowed": allowed, "fold": fold, "votes": [probs]}
            self._fresh_votes(self._pending, query, scaling)
        if self.readers == 0:
            self._finish_step()
        return out

    def reader_attention(
        self, query: torch.Tensor, full_mask: torch.Tensor | None, scaling: float, exact
    ) -> torch.Tensor:
        """Attention of a sharing layer's ``query`` over this layer's cache, in the same forward pass.

        The first chunk is exact over every key (``exact``), later chunks attend over what this layer holds;
        the reader's attention joins this layer's in choosing what to keep. The last reader compresses.
        """
        pending = self._pending
        if pending is None:
            raise RuntimeError("kvplan: a sharing layer attended before its source layer in this forward pass")
        p = self.params
        if pending["prefill"]:
            out = exact(self.storage.keys, self.storage.values)
            pending["votes"].append(self._prefill_scores(query, full_mask, scaling))
        elif pending.get("step"):
            out, probs = attend_step(query, self.storage.keys, self.storage.attention_values(), pending["bias"],
                                     scaling, p.head_reduce, p.per_kv_head, self.topn, self.estimator,
                                     full_mask is not None)
            pending["votes"].append(probs)
        else:
            out, probs = attend(query, self.storage.keys, self.storage.attention_values(), pending["allowed"],
                                scaling, p.head_reduce, p.per_kv_head, self.topn, self.estimator, pending["fold"])
            pending["votes"].append(probs)
            self._fresh_votes(pending, query, scaling)
        if len(pending["votes"]) == self.readers + 1:
            self._finish_step()
        return out

    def _combine_votes(self, votes: list[torch.Tensor]) -> torch.Tensor:
        """One score per token from the source's and its readers' attention (same rule as over query heads)."""
        if len(votes) == 1:
            return votes[0]
        stacked = torch.stack(votes)
        return stacked.amax(dim=0) if self.params.head_reduce == "max" else stacked.mean(dim=0)

    def _finish_step(self) -> None:
        pending, self._pending = self._pending, None
        combined = self._combine_votes(pending["votes"])
        if pending["prefill"]:
            self._compress_prefill(combined, pending["mask"])
            self._schedule()
        elif pending.get("step"):
            self._finish_decode_step(combined, pending["mask"])
        else:
            q_len = pending["allowed"].q_len
            self._fold_scores(combined, pending["allowed"].own(), pending["fold"] is not None)
            self._count_new_tokens(q_len)
            fresh = pending.get("fresh")
            if fresh is not None:
                self._start_rows(fresh, self._combine_votes(pending["fresh_votes"]), pending["key_valid"])
            self._schedule(*self._maybe_compact(fresh))

    # ----- the decode step ------------------------------------------------------------------------------------------
    def _step_bias(self, full_mask: torch.Tensor | None) -> torch.Tensor:
        """float32 ``[B, H_s, 1, T]`` additive mask of a decode step: 0 on the real tokens held (the new one
        included when the forward's mask lets it attend to itself), ``-inf`` on empty slots. Scores are ``>= 0`` on
        real tokens (``+inf`` on sinks) and ``-inf`` on empty slots, so the mask is ``min(scores, 0)``; a new token
        the mask hides (padding) is marked empty first."""
        scores = self.storage.scores
        if full_mask is not None:
            own = full_mask[:, 0, -1, -1]  # [B | 1]: may the new token attend to itself (is it real)
            scores[:, :, -1:].masked_fill_(~own[:, None, None], NEG_INF)
        return scores.clamp(max=0.0)[:, :, None, :]

    def _finish_decode_step(self, probs: torch.Tensor, full_mask: torch.Tensor | None) -> None:
        """The moving average of a decode step (in place), the real-token count, and the compaction check when the
        countdown says a (row, head) may be over its budget plus slack."""
        gamma = 1.0 - 1.0 / max(self.params.window, 1)
        scores = self.storage.scores
        scores.mul_(gamma).add_(probs[:, :, 0].mul_(1.0 - gamma))
        if full_mask is None:
            self.real_seen += 1
        else:
            self.real_seen += full_mask[:, 0, -1, -1:]
        self._countdown -= 1
        self.storage.reserve = max(self._countdown - 1, 0)
        if self._countdown <= 0:
            self._schedule(*self._maybe_compact(decode=True))

    def _schedule(self, limit: torch.Tensor | None = None, held: torch.Tensor | None = None) -> None:
        """Decode steps before any (row, head) can exceed its budget plus slack: a step adds at most one token and
        budgets never shrink, so ``min(budget + slack - held) + 1`` steps are safe. Also notes whether some row holds
        no real token yet (decode steps then take the general path, which starts such rows). ``limit`` (budget plus
        slack) and ``held``: the current ones when the caller has them (:meth:`_maybe_compact`)."""
        if limit is None:
            budget = self.params.budget(self.real_seen)
            limit = budget + self.params.slack_for(budget)
            held = self.storage.valid().sum(dim=-1)
        least_room, least_seen = torch.stack([(limit - held).min(), self.real_seen.min()]).tolist()  # one sync
        self._countdown = max(1, least_room + 1)
        self._maybe_empty = least_seen == 0
        self.storage.reserve = self._countdown - 1  # a buffer that grows makes room for the steps until the check

    def _fresh_votes(self, pending: dict, query: torch.Tensor, scaling: float) -> None:
        """Chunked prefill of a left-padded batch: rows that held no real token before this chunk and get their first
        real tokens in it ("fresh" rows: every earlier chunk was padding for them) are scored as the first chunk of
        their solo run is (``window_scores`` over what they hold, compressed to their budget); ``pending`` gets the
        rows, the key validity and this query's vote."""
        allowed = pending["allowed"]
        q_len = allowed.q_len
        if "fresh" not in pending:
            total = allowed.shape[-1]
            own = allowed.own()[:, 0]  # [B, Q]: is each new token real
            fresh = (self.real_seen[:, 0] == 0) & own.any(dim=-1)
            if not bool(fresh.any()):
                pending["fresh"] = None
                return
            old = self.storage.valid()[:, 0, : total - q_len]
            pending["fresh"], pending["key_valid"], pending["fresh_votes"] = fresh, torch.cat([old, own], -1), []
        if pending["fresh"] is None:
            return
        p = self.params
        pending["fresh_votes"].append(window_scores(query, self.storage.keys, pending["key_valid"], scaling, p.window,
                                                    p.pool, p.head_reduce, p.per_kv_head))

    def _start_rows(self, fresh: torch.Tensor, scores: torch.Tensor, key_valid: torch.Tensor) -> None:
        """Give ``fresh`` rows (bool ``[B]``) the scores of a first chunk: ``scores`` on real slots, sinks ``+inf``,
        empty slots ``-inf``; their young tokens start after this chunk."""
        valid = key_valid[:, None, :]
        rank = valid.long().cumsum(dim=-1)
        scores = scores.masked_fill(~valid, NEG_INF).masked_fill(valid & (rank <= self.params.sink), POS_INF)
        self.storage.scores = torch.where(fresh[:, None, None], scores, self.storage.scores)
        self.prefill_end = torch.where(fresh, self.seen, self.prefill_end)

    def _prefill_scores(self, query, full_mask, scaling) -> torch.Tensor:
        """float32 ``[B, H_s, T]`` window scores of ``query`` over every key held (the whole first chunk)."""
        keys = self.storage.keys
        valid = key_valid_from_mask(full_mask, query.shape[0], keys.shape[2], query.device)
        p = self.params
        return window_scores(query, keys, valid, scaling, p.window, p.pool, p.head_reduce, p.per_kv_head)

    def _compress_prefill(self, scores: torch.Tensor, full_mask) -> None:
        keys = self.storage.keys
        bsz, total = keys.shape[0], keys.shape[2]
        valid = key_valid_from_mask(full_mask, bsz, total, keys.device)[:, None, :]  # [B, 1, T]
        scores = scores.masked_fill(~valid, NEG_INF)
        rank = valid.long().cumsum(dim=-1)  # 1-based rank of each real token in its row
        scores = scores.masked_fill(valid & (rank <= self.params.sink), POS_INF)
        self.storage.scores = scores
        self.real_seen = valid.sum(dim=-1).expand(-1, scores.shape[1]).contiguous()  # [B, H_s]
        self.prefill_end = torch.full((bsz,), self.seen, dtype=torch.int64, device=keys.device)
        self.compressed = True
        self._compact(self.params.budget(self.real_seen))
        if self.topn > 0:
            self.storage.offload(ValueStore(keys.device))
            self.values = None

    def _allowed(self, full_mask: torch.Tensor | None, q_len: int) -> ChunkMask:
        """The mask ``[B, H_s, Q, T]`` over the held slots (:class:`ChunkMask`): old real tokens, plus the new chunk's
        own (causal) mask."""
        valid = self.storage.valid()
        new = None if full_mask is None else full_mask[:, :, :, -q_len:]
        return ChunkMask(valid[:, :, : valid.shape[-1] - q_len], new, q_len)

    def _fold_weights(self, q_len: int) -> torch.Tensor | None:
        """float32 ``[Q]`` weights of the closed-form moving average of a long chunk (:meth:`_fold_scores`), when the
        chunk's attention may be folded as it is computed (:func:`attend`'s ``fold``): the chunk is longer than
        :data:`FOLD_LOOP_MAX` and its votes combine linearly (no sharing layer votes, or votes averaged). None: the
        probabilities are kept per query and folded after the last vote."""
        if q_len <= FOLD_LOOP_MAX or (self.readers > 0 and self.params.head_reduce != "mean"):
            return None
        return fold_weights(q_len, self.params.window, self.storage.scores.device)

    def _fold_scores(self, probs: torch.Tensor, new_real: torch.Tensor, folded: bool = False) -> None:
        """Exponential moving average of the attention each held token receives (about ``window`` steps).

        ``probs``: float32 ``[B, H_s, Q, T]``, or with ``folded`` their sum weighted by :meth:`_fold_weights`
        ``[B, H_s, T]``; ``new_real``: bool ``[B, H_s, Q]``, which of the chunk's tokens are real
        (:meth:`ChunkMask.own`)."""
        gamma = 1.0 - 1.0 / max(self.params.window, 1)
        total = self.storage.scores.shape[-1]
        q_len = new_real.shape[-1]
        scores = self.storage.scores.clone()
        scores[:, :, total - q_len :] = torch.where(new_real, 0.0, NEG_INF)
        if q_len <= FOLD_LOOP_MAX:
            for i in range(q_len):
                scores = gamma * scores + (1.0 - gamma) * probs[:, :, i]
        else:  # the same average in closed form: gamma^Q * scores + sum_i (1 - gamma) gamma^(Q - 1 - i) probs_i
            if not folded:
                probs = torch.matmul(fold_weights(q_len, self.params.window, probs.device), probs)
            decay = max(gamma ** q_len, torch.finfo(torch.float32).tiny)  # never 0: -inf and +inf scores stay so
            scores = scores * decay + probs
        self.storage.scores = scores

    def _count_new_tokens(self, q_len: int) -> None:
        total = self.storage.scores.shape[-1]
        self.real_seen = self.real_seen + self.storage.valid()[:, :, total - q_len :].sum(dim=-1)

    def _maybe_compact(
        self, fresh: torch.Tensor | None = None, decode: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Compact each (row, head) that holds more than its budget plus slack, and every ``fresh`` row (bool
        ``[B]``, its first real chunk) to its budget; the others keep what they hold. Returns the budgets and what
        each (row, head) holds now (int64 ``[B, H_s]``).

        Decisions are per row, from that row's own counts, so a row of a padded batch evolves exactly as it
        would alone.
        """
        budget = self.params.budget(self.real_seen)
        held = self.storage.valid().sum(dim=-1)
        limit = budget + self.params.slack_for(budget)
        over = held > limit
        if fresh is not None:
            over = over | fresh[:, None]
        if bool(over.any()):
            # while decoding, the compacted buffers keep room for the tokens until the next compaction (<= slack + 1)
            reserve = int(self.params.slack_for(int(budget.max()))) + 1 if decode else 0
            held = torch.where(over, budget, held)
            self._compact(held, reserve)
        return limit, held

    def _effective_scores(self) -> torch.Tensor:
        """Scores with the moving-average start-up bias of decode-born tokens removed, recent window protected."""
        scores = self.storage.scores
        born = self.storage.positions
        young = born >= self.prefill_end[:, None, None]
        gamma = 1.0 - 1.0 / max(self.params.window, 1)
        age = (self.seen - born).clamp(min=1).double()
        correction = (1.0 - torch.pow(gamma, age)).float()  # in (0, 1]: +-inf scores (sinks, empty slots) stay so
        scores = torch.where(young, scores / correction, scores)  # a new tensor: the storage's scores stay
        if self.params.window > 0:
            recent = scores[..., -self.params.window :]
            recent.masked_fill_(recent > NEG_INF, POS_INF)
        return scores

    def _compact(self, budget: torch.Tensor, reserve: int = 0) -> None:
        """Keep, per (row, head), its ``budget`` best tokens (original order); narrower ones get empty slots."""
        total = self.storage.width
        # the rectangle is as wide as its widest (row, head); narrower ones mark what they drop as empty slots
        low, high = (int(v) for v in budget.aminmax())
        width = min(high, total)
        scores = self._effective_scores()
        if low == high and high <= total:
            # every (row, head) keeps the same number and holds at least that many real tokens (``budget`` is never
            # above what a row holds): the best ``width`` by score, ties to the earlier slot — the set the general
            # path below takes, without ranking every slot
            idx = top_slots(scores, width).sort(dim=-1).values
            self.storage.gather(idx, None, reserve)
            self.keys, self.values = self.storage.keys, self.storage.values
            return
        order = torch.argsort(scores, dim=-1, descending=True, stable=True)
        rank = torch.empty_like(order)
        rank.scatter_(-1, order, torch.arange(total, device=order.device).expand_as(order))
        keep = rank < budget[..., None]
        # take the kept slots first, then (for narrower rows) the best leftovers as empty slots; original order
        pick = torch.where(keep, 2.0, 0.0) + torch.where(scores > NEG_INF, 1.0, 0.0)
        idx = torch.topk(pick, width, dim=-1, sorted=False).indices.sort(dim=-1).values
        self.storage.gather(idx, keep.gather(-1, idx), reserve)
        self.keys, self.values = self.storage.keys, self.storage.values



def theoretical_kept(seen: int, params: PyramidParams) -> int:
    """Tokens a layer keeps, in theory, after seeing ``seen`` real tokens (for memory accounting)."""
    return int(params.budget(torch.tensor([seen]))[0]) if seen > 0 else 0


# ----------------------------------------------------------------------------------------------------------
# The registration: plan schema, parameters, runtime hook
# ----------------------------------------------------------------------------------------------------------

_TOLERANCE = 1e-4  # float32 sums of probabilities may exceed 1 by rounding


def _check_layer_keep(values: torch.Tensor, context: TensorContext) -> str | None:
    """Every entry in (0, 1]."""
    if bool(((values <= 0) | (values > 1)).any()):
        return "every value must be in (0, 1]"
    return None


def _readers(context: TensorContext) -> torch.Tensor:
    """Readers of each layer under the plan's KVSharer map (zeros without one)."""
    layers = int(context.fingerprint["num_hidden_layers"])
    sources = context.tensors.get("kvsharer.share_source")
    if sources is None or tuple(sources.shape) != (layers,):
        return torch.zeros(layers)
    sources = sources.long().clamp(0, layers - 1)
    counts = torch.bincount(sources, minlength=layers)[:layers].float()
    return counts - (sources == torch.arange(layers)).float()


def _check_captured_curve(values: torch.Tensor, context: TensorContext) -> str | None:
    """Captured attention mass per layer on a grid of keep fractions: non-decreasing along the grid, within
    ``[0, 1 + readers]`` (an owner's curve adds one curve per KVSharer reader)."""
    if values.shape[1] < 2:
        return "needs at least 2 grid points (keep fractions 0 and 1)"
    limit = 1.0 + _readers(context)[:, None] + _TOLERANCE
    if bool((values < -_TOLERANCE).any()) or bool((values > limit).any()):
        return "values must be in [0, 1] (plus 1 per layer that reads this layer's cache)"
    if bool((values[:, 1:] < values[:, :-1] - _TOLERANCE).any()):
        return "each layer's curve must be non-decreasing along the grid"
    return None


def _check_captured_mass(values: torch.Tensor, context: TensorContext) -> str | None:
    if bool((values < -_TOLERANCE).any()) or bool((values > 1 + _TOLERANCE).any()):
        return "values must be in [0, 1] (a fraction of attention mass)"
    return None


def configure(plan, layers: list[LayerPlan], config) -> None:
    """Give every full-attention layer with ``layer_keep < 1`` its token budget (sliding-window layers are already
    bounded by their window and keep what they see)."""
    keep = plan.tensors["pyramidinfer.layer_keep"].tolist()
    args = METHOD.read_params(plan.params.get("pyramidinfer", {}))
    for layer, fraction in zip(layers, keep):
        if layer.kind == "full_attention" and fraction < 1.0:
            layer.selection = PyramidParams(keep=float(fraction), **args)


METHOD = MethodSpec(
    name="pyramidinfer",
    description="PyramidInfer: each layer keeps a calibrated fraction of the context, chosen by recent-query "
    "attention (sink tokens and the recent window are always kept)",
    tensors=(
        TensorSpec("pyramidinfer.layer_keep", torch.float32, ("L",), _check_layer_keep,
                   "fraction of the context each layer keeps, in (0, 1]"),
        TensorSpec("pyramidinfer.captured_curve", torch.float32, ("L", "*"), _check_captured_curve,
                   "calibration: attention mass captured at keep fractions 0..1 (grid)", required=False),
        TensorSpec("pyramidinfer.captured_mass", torch.float32, ("L",), _check_captured_mass,
                   "calibration: attention mass captured at the chosen fraction", required=False),
    ),
    params=(
        ParamSpec("window", "int", 32, "recent tokens always kept; also the number of last queries that score the "
                  "context", minimum=1, in_plan="always"),
        ParamSpec("sink", "int", 4, "first tokens always kept (attention sinks)", minimum=0,
                  in_plan="always"),
        ParamSpec("slack", "int", None, "tokens a layer may hold above its budget before it compacts while "
                  "decoding (unset: max(4, budget // 64))", minimum=0),
        ParamSpec("pool", "int", 1, "average-pooling width of the prefill scores along the sequence (1 = none)",
                  minimum=1),
        ParamSpec("head_reduce", "str", "mean", "how the query heads' attention is combined into one score per "
                  "token", choices=("mean", "max")),
        ParamSpec("horizon", "int", 64, "calibration: queries after each cut point whose attention measures what a "
                  "budget captures", minimum=1, stage="calibration"),
    ),
    configure=configure,
    calibration_step="calibrate.pyramidinfer:calibration_step",
    calibration_order=1,
    card_column=("keep", "pyramidinfer.layer_keep", lambda row: f"{row:.3f}"),
)


__all__ = ["BudgetedLayer", "DenseStorage", "METHOD", "PyramidParams", "window_scores", "attend", "attend_step",
           "theoretical_kept"]
