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
from transformers.cache_utils import DynamicLayer

NEG_INF = float("-inf")
POS_INF = float("inf")


@dataclass(frozen=True)
class PyramidParams:
    """Per-layer PyramidInfer settings taken from a plan.

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
    window: int = 32
    sink: int = 4
    slack: int | None = None
    pool: int = 1
    head_reduce: str = "mean"

    def budget(self, seen: torch.Tensor) -> torch.Tensor:
        """Tokens to keep for rows that have seen ``seen`` real tokens (int64 ``[B]``)."""
        want = torch.ceil(seen.to(torch.float64) * self.keep).to(torch.int64)
        floor = torch.clamp(seen, max=self.sink + self.window)
        return torch.minimum(torch.maximum(want, floor), seen)

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

    Returns:
        float32 ``[B, T]``: over the real window queries, the mean of their attention probabilities reduced over
        query heads (causal within the window; padding gets 0).
    """
    bsz, n_q_heads, q_len, dim = query.shape
    n_kv = keys.shape[1]
    total = keys.shape[2]
    w = min(window, q_len)
    groups = n_q_heads // n_kv
    q = query[:, :, -w:, :].float().reshape(bsz, n_kv, groups * w, dim)
    logits = torch.matmul(q, keys.float().transpose(-1, -2)) * scaling  # [B, H_kv, G*w, T]
    logits = logits.view(bsz, n_kv, groups, w, total)
    q_pos = torch.arange(total - w, total, device=keys.device)
    k_pos = torch.arange(total, device=keys.device)
    allowed = (k_pos[None, :] <= q_pos[:, None])[None] & key_valid[:, None, :]  # [B, w, T]
    logits = logits.masked_fill(~allowed[:, None, None], NEG_INF)
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # rows of padding queries are all -inf
    per_query = reduce_heads(probs, head_reduce)  # [B, w, T]
    real_q = key_valid[:, -w:]  # a window query is real when its own token is
    n_real = real_q.sum(dim=1, keepdim=True).clamp(min=1)
    scores = (per_query * real_q[:, :, None]).sum(dim=1) / n_real
    if pool > 1:
        scores = torch.nn.functional.avg_pool1d(scores[:, None], pool, stride=1, padding=pool // 2)[:, 0, :total]
        scores = scores * key_valid
    return scores


def reduce_heads(probs: torch.Tensor, how: str) -> torch.Tensor:
    """``[B, H_kv, G, Q, T]`` probabilities → ``[B, Q, T]`` by ``mean`` or ``max`` over the query heads."""
    if how == "max":
        return probs.amax(dim=(1, 2))
    if how == "mean":
        return probs.mean(dim=(1, 2))
    raise ValueError(f"head_reduce must be 'mean' or 'max', not {how!r}")


def attend(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    allowed: torch.Tensor,
    scaling: float,
    head_reduce: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain attention over what a layer holds, returning the output and the head-mean probabilities.

    Args:
        query: ``[B, H_q, Q, d]``; keys/values: ``[B, H_kv, T, d]`` (grouped-query heads are not copied).
        allowed: bool ``[B, Q, T]``.

    Returns:
        output ``[B, Q, H_q, d]`` (the layout transformers' attention functions return) and float32 ``[B, Q, T]``
        probabilities reduced over query heads (``head_reduce``).
    """
    bsz, n_q_heads, q_len, dim = query.shape
    n_kv, total = keys.shape[1], keys.shape[2]
    groups = n_q_heads // n_kv
    q = query.reshape(bsz, n_kv, groups * q_len, dim)
    logits = torch.matmul(q, keys.transpose(-1, -2)).float() * scaling  # [B, H_kv, G*Q, T]
    logits = logits.view(bsz, n_kv, groups, q_len, total).masked_fill(~allowed[:, None, None], NEG_INF)
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    out = torch.matmul(probs.view(bsz, n_kv, groups * q_len, total).to(values.dtype), values)
    out = out.view(bsz, n_q_heads, q_len, dim).transpose(1, 2).contiguous()
    return out, reduce_heads(probs, head_reduce)


class BudgetedLayer(DynamicLayer):
    """Cache layer that physically keeps a budget of the tokens it has seen (PyramidInfer).

    Holds ``keys``/``values`` ``[B, H_kv, T, d]``, ``positions`` int32 ``[B, T]`` (index of each kept token in the
    full sequence, i.e. the column of transformers' attention mask) and ``scores`` float32 ``[B, T]`` (attention
    received; ``-inf`` marks a padding slot, ``+inf`` a sink). ``get_seq_length()`` reports the tokens *seen*, so
    positions and masks stay those of the full sequence; ``kept_length()`` is what is really held.
    """

    def __init__(self, params: PyramidParams, readers: int = 0):
        super().__init__()
        self.params = params
        self.readers = readers  # KVSharer: later layers that attend over this layer's cache
        self._pending: dict | None = None  # this step's votes while readers still have to attend
        self.seen = 0
        self.positions: torch.Tensor | None = None
        self.scores: torch.Tensor | None = None
        self.real_seen: torch.Tensor | None = None  # int64 [B]: non-padding tokens seen per row
        self.prefill_end = 0  # tokens seen when the first chunk was compressed; later tokens are decode-born
        self.compressed = False

    # ----- transformers' layer protocol -------------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q_len = key_states.shape[-2]
        new_pos = torch.arange(self.seen, self.seen + q_len, device=key_states.device, dtype=torch.int32)
        new_pos = new_pos.expand(key_states.shape[0], q_len)
        if self.positions is None:
            self.positions = new_pos.contiguous()
            self.scores = torch.zeros(new_pos.shape, dtype=torch.float32, device=key_states.device)
        else:
            self.positions = torch.cat([self.positions, new_pos], dim=1)
            self.scores = torch.cat([self.scores, self.scores.new_zeros(new_pos.shape)], dim=1)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.seen += q_len
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length_or_cache_position, *args) -> tuple[int, int]:
        q_len = (
            query_length_or_cache_position.shape[0]
            if isinstance(query_length_or_cache_position, torch.Tensor)
            else int(query_length_or_cache_position)
        )
        return self.seen + q_len, 0

    def reset(self) -> None:
        super().reset()
        self.keys = self.values = None
        self.is_initialized = False
        self.seen = 0
        self.positions = self.scores = self.real_seen = None
        self.prefill_end = 0
        self.compressed = False
        self._pending = None

    def crop(self, *args, **kwargs) -> None:
        raise NotImplementedError(
            "a PyramidInfer layer cannot be cropped (assisted/speculative decoding rolls back tokens it may have "
            "evicted); generate without an assistant model while a plan is applied"
        )

    def _select_rows(self, fn) -> None:
        for name in ("keys", "values", "positions", "scores", "real_seen"):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, fn(tensor))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_rows(lambda t: t[indices.to(t.device)])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    # ----- what the layer holds ---------------------------------------------------------------------------------
    def kept_length(self) -> int:
        return 0 if self.keys is None or self.keys.numel() == 0 else self.keys.shape[-2]

    def physical_bytes(self) -> int:
        return sum(
            t.numel() * t.element_size()
            for t in (self.keys, self.values, self.positions, self.scores, self.real_seen)
            if t is not None
        )

    def key_valid(self) -> torch.Tensor:
        """bool ``[B, T]``: slots holding a real (non-padding) token."""
        return self.scores > NEG_INF

    # ----- attention ----------------------------------------------------------------------------------------------
    def attention(
        self, query: torch.Tensor, full_mask: torch.Tensor | None, scaling: float, prefill_fn
    ) -> torch.Tensor:
        """Attention of ``query`` (the chunk just appended) over what the layer holds, then compression.

        ``full_mask`` is the bool mask ``[B|1, 1, Q, seen]`` over the full sequence, or ``None`` when there is no
        padding. ``prefill_fn(keys, values)`` computes the exact (stock) output of the first chunk.
        Returns ``[B, Q, H_q, d]``. When other layers read this cache (KVSharer), compression waits until the
        last of them has attended (:meth:`reader_attention`), and their queries vote on what is kept.
        """
        q_len = query.shape[2]
        if not self.compressed:
            out = prefill_fn(self.keys, self.values)
            self._pending = {"prefill": True, "mask": full_mask, "votes": [self._prefill_scores(query, full_mask, scaling)]}
        else:
            allowed = self._allowed(full_mask, q_len)
            out, probs = attend(query, self.keys, self.values, allowed, scaling, self.params.head_reduce)
            self._pending = {"prefill": False, "allowed": allowed, "votes": [probs]}
        if self.readers == 0:
            self._finish_step()
        return out

    def reader_attention(
        self, query: torch.Tensor, full_mask: torch.Tensor | None, scaling: float, prefill_fn
    ) -> torch.Tensor:
        """Attention of a sharing layer's ``query`` over this layer's cache, in the same forward pass.

        The first chunk is exact over every key (``prefill_fn``), later chunks attend over what this layer holds;
        the reader's attention joins this layer's in choosing what to keep. The last reader compresses.
        """
        pending = self._pending
        if pending is None:
            raise RuntimeError("kvplan: a sharing layer attended before its source layer in this forward pass")
        if pending["prefill"]:
            out = prefill_fn(self.keys, self.values)
            pending["votes"].append(self._prefill_scores(query, full_mask, scaling))
        else:
            out, probs = attend(query, self.keys, self.values, pending["allowed"], scaling, self.params.head_reduce)
            pending["votes"].append(probs)
        if len(pending["votes"]) == self.readers + 1:
            self._finish_step()
        return out

    @property
    def step_pending(self) -> bool:
        """True while this forward's compression waits for readers that have not attended yet."""
        return self._pending is not None

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
        else:
            q_len = combined.shape[1]
            self._fold_scores(combined, pending["allowed"])
            self._count_new_tokens(q_len)
            self._maybe_compact()

    def _prefill_scores(self, query, full_mask, scaling) -> torch.Tensor:
        """float32 ``[B, T]`` window scores of ``query`` over every key held (the whole first chunk)."""
        valid = _key_valid_from_mask(full_mask, query.shape[0], self.keys.shape[2], query.device)
        p = self.params
        return window_scores(query, self.keys, valid, scaling, p.window, p.pool, p.head_reduce)

    def _compress_prefill(self, scores: torch.Tensor, full_mask) -> None:
        bsz, total = self.keys.shape[0], self.keys.shape[2]
        valid = _key_valid_from_mask(full_mask, bsz, total, self.keys.device)
        scores = scores.masked_fill(~valid, NEG_INF)
        rank = valid.long().cumsum(dim=1)  # 1-based rank of each real token in its row
        scores = scores.masked_fill(valid & (rank <= self.params.sink), POS_INF)
        self.scores = scores
        self.real_seen = valid.sum(dim=1)
        self.prefill_end = self.seen
        self.compressed = True
        self._compact(self.params.budget(self.real_seen))

    def _allowed(self, full_mask: torch.Tensor | None, q_len: int) -> torch.Tensor:
        """bool ``[B, Q, T]`` over the held slots: old real tokens, plus the new chunk's own (causal) mask."""
        bsz, total = self.keys.shape[0], self.keys.shape[2]
        old = self.key_valid()[:, : total - q_len]
        if full_mask is None:
            new = torch.ones(q_len, q_len, dtype=torch.bool, device=old.device).tril()
            new = new.expand(bsz, q_len, q_len)
        else:
            new = full_mask[:, 0, :, -q_len:].expand(bsz, q_len, q_len)
        return torch.cat([old[:, None, :].expand(bsz, q_len, total - q_len), new], dim=2)

    def _fold_scores(self, probs: torch.Tensor, allowed: torch.Tensor) -> None:
        """Exponential moving average of the attention each held token receives (about ``window`` steps)."""
        gamma = 1.0 - 1.0 / max(self.params.window, 1)
        total = self.scores.shape[1]
        q_len = probs.shape[1]
        new_real = allowed[:, torch.arange(q_len), total - q_len + torch.arange(q_len)]  # [B, Q] own diagonal
        scores = self.scores.clone()
        scores[:, total - q_len :] = torch.where(new_real, 0.0, NEG_INF)
        for i in range(q_len):
            scores = gamma * scores + (1.0 - gamma) * probs[:, i]
        self.scores = scores

    def _count_new_tokens(self, q_len: int) -> None:
        total = self.scores.shape[1]
        self.real_seen = self.real_seen + self.key_valid()[:, total - q_len :].sum(dim=1)

    def _maybe_compact(self) -> None:
        """Compact each row that holds more than its budget plus slack; the others keep what they hold.

        Decisions are per row, from that row's own counts, so a row of a padded batch evolves exactly as it
        would alone.
        """
        budget = self.params.budget(self.real_seen)
        held = self.key_valid().sum(dim=1)
        over = held > budget + self.params.slack_for(budget)
        if bool(over.any()):
            self._compact(torch.where(over, budget, held))

    def _effective_scores(self) -> torch.Tensor:
        """Scores with the moving-average start-up bias of decode-born tokens removed, recent window protected."""
        scores = self.scores
        born = self.positions.long()
        young = born >= self.prefill_end
        if young.any():
            gamma = 1.0 - 1.0 / max(self.params.window, 1)
            age = (self.seen - born).clamp(min=1).double()
            correction = (1.0 - torch.pow(gamma, age)).float()
            scores = torch.where(young & torch.isfinite(scores), scores / correction, scores)
        recent = torch.zeros_like(scores, dtype=torch.bool)
        if self.params.window > 0:
            recent[:, -self.params.window :] = True
        return torch.where(recent & (scores > NEG_INF), POS_INF, scores)

    def _compact(self, budget: torch.Tensor) -> None:
        """Keep, per row, its ``budget`` best tokens (original order); rows needing fewer get padding slots."""
        total = self.kept_length()
        # the rectangle is as wide as its widest row; narrower rows mark what they drop as padding slots
        width = min(int(budget.max()), total)
        scores = self._effective_scores()
        order = torch.argsort(scores, dim=1, descending=True, stable=True)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(total, device=order.device).expand_as(order))
        keep = rank < budget[:, None]
        # take the kept slots first, then (for narrower rows) the best leftovers as padding slots; original order
        pick = torch.where(keep, 2.0, 0.0) + torch.where(scores > NEG_INF, 1.0, 0.0)
        idx = torch.topk(pick, width, dim=1, sorted=False).indices.sort(dim=1).values
        kept = keep.gather(1, idx)
        idx_kv = idx[:, None, :, None].expand(-1, self.keys.shape[1], -1, self.keys.shape[3])
        self.keys = self.keys.gather(2, idx_kv)
        self.values = self.values.gather(2, idx_kv)
        self.positions = self.positions.gather(1, idx)
        self.scores = self.scores.gather(1, idx).masked_fill(~kept, NEG_INF)


def _key_valid_from_mask(full_mask: torch.Tensor | None, bsz: int, total: int, device) -> torch.Tensor:
    """bool ``[B, T]``: keys some query may attend to (padding keys are masked in every row)."""
    if full_mask is None:
        return torch.ones(bsz, total, dtype=torch.bool, device=device)
    return full_mask[:, 0].any(dim=1).expand(bsz, total)


def theoretical_kept(seen: int, params: PyramidParams) -> int:
    """Tokens a layer keeps, in theory, after seeing ``seen`` real tokens (for memory accounting)."""
    return int(params.budget(torch.tensor([seen]))[0]) if seen > 0 else 0


__all__ = ["BudgetedLayer", "PyramidParams", "window_scores", "attend", "theoretical_kept"]
