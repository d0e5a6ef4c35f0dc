"""KCache at run time: keys stay with the model, values live in a second store, and each decode step reads only the
top-N value rows its query attends to most.

Plan tensor ``kcache.topn`` int32 ``[L]``: per layer, the value rows a decode step reads per (row, KV head); ``0``
keeps the layer's values with the model (all read, the stock path). Applies to full-attention layers that own a
cache (a KVSharer reader reads its source's store with its own queries and the source's N; sliding-window layers are
already bounded by their window and keep their values).

What a KCache layer does (``topn[l] = N > 0``):

- **Prefill** (the first forward): exact attention over everything with the freshly computed K/V (transformers'
  SDPA), then the values move out to the store (:class:`ValueStore`) and the model-side copy is freed.
- **Decode step** (one new token per row): the query is scored against *every* key the layer keeps (keys are
  complete with the model, so the softmax and its denominator are exact), each (row, KV head) takes the ``N`` slots
  with the largest probability **summed over its group's query heads** (GQA: one index set per KV head, not one per
  query head), one batched gather reads only those value rows from the store, and the output is estimated from them
  (the plan's ``estimator``):

  - ``residual_mean`` (default): ``sum_sel p_i v_i + (1 - sum_sel p_i) * mean of the unselected values``. The
    probabilities are exact, so the mass the selection misses is known; it is given to the mean of the rows not
    read, which the layer knows without reading them from a small resident proxy: the per-(row, KV head) **sum of
    every value it holds** (float32 ``[B, H_kv, d]`` with the model, kept up to date as values arrive, are evicted
    or rows are reordered; empty and padding slots hold zero values) minus the selected rows. On SmolLM2 this
    cuts the output error at the same N by about a third (``bench/kcache_residual_probe.py``).
  - ``renormalise``: the softmax renormalised over the selected set (a convex combination of the rows read; what
    the KCache paper's abstract describes).

  When ``N`` is at least what the layer holds, every row is read and the output is exactly the stock one.
- **A later multi-token chunk** (e.g. a question fed after a compressed context, chunked prefill) attends exactly
  over all held rows (it reads them all).

The store is an ordinary CPU buffer; when the model runs on CUDA it is page-locked (pinned) CPU memory, rows are
gathered on the host into a pinned staging buffer and copied to the device asynchronously. Bytes are *moved*, not
removed: ``physical_bytes`` counts the store, ``store_bytes`` says how much of it lives in the store.

Composition: KCache applies to what a layer keeps. A PyramidInfer layer (``BudgetedLayer``) keeps its rectangle's
values in a dense store; a KV-Compress layer (``RaggedLayer``) keeps its blocks' values in the store (its dense
decode tail of at most ``slack`` tokens waits with the model until the next merge, like KCache's "recent values stay
on the device until their page is flushed"); the layer's own eviction scores still come from the exact
probabilities over its keys. Without a token budget, :class:`OffloadedLayer` keeps everything.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from .layers import Held, LayerPlan, PlanLayer, RowSelection, cat_rows, check_same, key_valid_from_mask, tensor_bytes
from .schema import MethodSpec, ParamSpec, TensorContext, TensorSpec

NEG_INF = float("-inf")
ESTIMATORS = ("residual_mean", "renormalise")


def check_estimator(estimator: str) -> None:
    if estimator not in ESTIMATORS:
        raise ValueError(f"KCache estimator must be one of {', '.join(ESTIMATORS)}, not {estimator!r}")


def store_device_for(model_device: torch.device) -> tuple[torch.device, bool]:
    """Where a layer on ``model_device`` keeps its values: the CPU, pinned when the model runs on CUDA."""
    return torch.device("cpu"), model_device.type == "cuda"


def top_slots(score: torch.Tensor, n: int) -> torch.Tensor:
    """int64 ``[..., n]`` (unordered): the ``n`` slots of largest ``score`` along the last dim, ties to the earlier slot.

    The tie rule matters when a query attends uniformly (e.g. the zero embedding of a padding token): a left-padded
    row must pick the same tokens as its solo run. ``topk`` alone breaks ties arbitrarily and a stable sort costs
    4x more, so the key is exact instead: the float's bits (monotone for the non-negative scores; the ``-1`` fillers
    of ragged storage stay below them) shifted left, plus the slot's distance from the end of the row.
    """
    width = score.shape[-1]
    if width >= 1 << 21:
        return torch.sort(score, dim=-1, descending=True, stable=True).indices[..., :n]
    bits = score.float().contiguous().view(torch.int32).to(torch.int64)
    key = bits * (1 << 21) + torch.arange(width, 0, -1, device=score.device)
    return key.topk(n, dim=-1, sorted=False).indices


class ValueStore:
    """One layer's value rows in the second store, and the counters of what decode steps read from it.

    Two layouts share it: a dense rectangle ``[B, H_kv, capacity, d]`` whose first ``length`` slots are used
    (:meth:`append` grows it by about 1/16 at a time; stock and PyramidInfer layers), or whatever tensor a layer
    :meth:`put` there (KV-Compress's blocks ``[N, block, d]``). Either way rows are addressed by their index in the
    buffer flattened to ``[-1, d]``, and :meth:`fetch` reads a batch of them to the model's device in one gather.

    ``sums``: float32, on the model's device: the sum of the value rows each (row, KV head) holds — ``[B, H_kv, d]``
    for the dense layout (kept by :meth:`put` with ``valid``, :meth:`append` and :meth:`select_rows`), ``[S, d]`` per
    segment for a layer's own layout (which sets it) — the resident proxy of the ``residual_mean`` estimator.
    Slots that hold no real token hold zero values, so that they add nothing to it.

    Counters (plain ints, no device synchronisation): ``rows_read`` / ``rows_held`` summed over the steps that read
    from the store, ``steps``, and the last step's ``last_read`` / ``last_held``.
    """

    def __init__(self, model_device: torch.device):
        self.model_device = torch.device(model_device)
        self.device, self.pin = store_device_for(self.model_device)
        self.buffer: torch.Tensor | None = None
        self.length = 0  # dense layout: slots used along dim -2
        self.sums: torch.Tensor | None = None
        self.rows_read = self.rows_held = self.steps = self.last_read = self.last_held = 0

    # ----- placing values --------------------------------------------------------------------------------------
    def empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        """A new (pinned where needed) store tensor."""
        return torch.empty(shape, dtype=dtype, device=self.device, pin_memory=self.pin)

    def zeros(self, shape, dtype: torch.dtype) -> torch.Tensor:
        return self.empty(shape, dtype).zero_()

    def put(self, values: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Make ``values`` (any layout) the whole store; returns the store's tensor.

        Callers hand over a tensor nobody else keeps (the prefill's values, a compaction's or a row selection's
        result): one that already lives where the store does (its device, contiguous, pinned when the store is) is
        kept as it is, anything else is copied in (on CUDA: the device-to-host copy).

        Dense layout: ``valid`` bool ``[B, 1 | H_kv, T]`` marks the slots holding a real token; the others are
        zeroed (attention never reads them) and :attr:`sums` is recomputed. Without it ``sums`` is left to the
        caller (a layer's own layout) and set to None."""
        if valid is not None:
            values.masked_fill_(~valid[..., None].to(values.device), 0)  # a tensor nobody else keeps
            self.sums = values.sum(dim=-2, dtype=torch.float32).to(self.model_device)
        else:
            self.sums = None
        if values.device == self.device and values.is_contiguous() and (not self.pin or values.is_pinned()):
            buffer = values
        else:
            buffer = self.empty(values.shape, values.dtype).copy_(values)
        self.buffer = buffer
        self.length = values.shape[-2] if values.dim() >= 2 else 0
        return buffer

    def append(self, chunk: torch.Tensor) -> None:
        """Dense layout: append ``[B, H_kv, Q, d]`` after the used slots (grows the capacity when needed)."""
        q_len = chunk.shape[-2]
        if self.sums is not None:
            self.sums += chunk.sum(dim=-2, dtype=torch.float32)
        if self.buffer is None:  # a copy: the model's tensor may be a view of a larger (fused) buffer
            self.buffer = self.empty(chunk.shape, chunk.dtype).copy_(chunk)
            self.length = q_len
            return
        capacity = self.buffer.shape[-2]
        if self.length + q_len > capacity:
            grown = self.length + q_len + max(16, (self.length + q_len) // 16)
            buffer = self.empty((*self.buffer.shape[:-2], grown, self.buffer.shape[-1]), self.buffer.dtype)
            buffer[..., : self.length, :].copy_(self.buffer[..., : self.length, :])
            self.buffer = buffer
        self.buffer[..., self.length : self.length + q_len, :].copy_(chunk)
        self.length += q_len

    def view(self) -> torch.Tensor:
        """Dense layout: the used slots ``[B, H_kv, length, d]`` (a view of the store)."""
        return self.buffer[..., : self.length, :]

    def select_rows(self, fn) -> None:
        """Dense layout: apply a batch-row selection ``fn`` (beam search, contrastive search) to rows and sums."""
        sums = self.sums
        self.put(fn(self.view()))
        self.sums = None if sums is None else fn(sums)

    def join_rows(self, others: list[ValueStore], dense: bool = True) -> None:
        """Row join of the stores of layers being joined (``PlanLayer.join_rows``): the counters add up and, for the
        dense layout (``dense``), the rows of ``others`` follow this store's, a narrower store's rows preceded by
        zero slots (no token) up to the widest (right-aligned, as ``DenseStorage.join_rows`` aligns the keys); ``sums``
        likewise. A layer with its own layout joins its tensors
        itself (``dense=False``: counters only)."""
        stores = [self, *others]
        if dense and any(store.buffer is not None for store in stores):
            views = [store.view() for store in stores]
            width = max(view.shape[-2] for view in views)
            sums = cat_rows([store.sums for store in stores])
            if all(view.shape[-2] == width for view in views):
                joined = torch.cat(views, dim=0)
            else:
                shape = (sum(view.shape[0] for view in views), *views[0].shape[1:-2], width, views[0].shape[-1])
                joined = self.zeros(shape, views[0].dtype)
                row = 0
                for view in views:
                    joined[row : row + view.shape[0], ..., width - view.shape[-2] :, :] = view
                    row += view.shape[0]
            del views
            for store in others:
                store.clear()
            self.put(joined)
            self.sums = sums
        for name in ("rows_read", "rows_held", "last_read", "last_held"):
            setattr(self, name, sum(getattr(store, name) for store in stores))
        self.steps = max(store.steps for store in stores)

    def clear(self) -> None:
        self.buffer = None
        self.length = 0
        self.sums = None

    def tensors(self) -> tuple:
        return (self.buffer,)

    def nbytes(self) -> int:
        return 0 if self.buffer is None else self.buffer.numel() * self.buffer.element_size()

    def resident(self) -> tuple:
        """What the store keeps with the model (the sums): counted with the model's bytes."""
        return (self.sums,)

    # ----- reading -------------------------------------------------------------------------------------------------
    def fetch(self, source: torch.Tensor, flat_idx: torch.Tensor) -> torch.Tensor:
        """Rows ``flat_idx`` (int64, any shape ``[...]``) of the store tensor ``source`` seen as ``[-1, d]``, on the
        model's device as ``[..., d]``: one host gather (into a pinned staging buffer on CUDA), one copy."""
        dim = source.shape[-1]
        flat = source.reshape(-1, dim)
        idx = flat_idx.reshape(-1)
        if idx.device != self.device:
            idx = idx.to(self.device)
        if self.pin:
            staging = self.empty((idx.numel(), dim), source.dtype)
            torch.index_select(flat, 0, idx, out=staging)
            rows = staging.to(self.model_device, non_blocking=True)
        else:
            rows = flat.index_select(0, idx).to(self.model_device)
        return rows.view(*flat_idx.shape, dim)

    def to_model(self, tensor: torch.Tensor) -> torch.Tensor:
        """All of ``tensor`` (a store tensor) on the model's device (non-blocking from pinned memory)."""
        return tensor.to(self.model_device, non_blocking=self.pin)

    def count(self, read: int, held: int) -> None:
        self.rows_read += read
        self.rows_held += held
        self.steps += 1
        self.last_read, self.last_held = read, held

    def read_all(self) -> torch.Tensor:
        """Dense layout: every used row ``[B, H_kv, T, d]`` on the model's device (counted as a read of all)."""
        values = self.view()
        rows = values.shape[0] * values.shape[1] * values.shape[2]
        self.count(rows, rows)
        return self.to_model(values)

    def topn_output(self, probs: torch.Tensor, topn: int, valid_count: torch.Tensor | None = None) -> torch.Tensor:
        """KCache's readout over the dense store.

        Args:
            probs: float32 ``[B, H_kv, M, T]``: exact softmax probabilities of the ``M`` query heads (× queries) of
                each KV head's group over the ``T`` slots of the store (0 for masked slots).
            topn: rows to read per (row, KV head).
            valid_count: ``residual_mean`` estimator: int64 ``[B, 1 | H_kv]`` real tokens each (row, KV head) holds
                (needs :attr:`sums`); None: ``renormalise``.

        Returns:
            ``[B, H_kv, M, d]`` in the store's dtype: with ``topn >= T`` exactly ``probs @ values`` (every row read);
            otherwise, per (row, KV head), the ``topn`` slots of largest summed probability, estimated as
            :func:`estimate` says.
        """
        bsz, n_kv, m, total = probs.shape
        if topn >= total:
            values = self.read_all()
            return torch.matmul(probs.to(values.dtype), values)
        idx = top_slots(probs.sum(dim=2), topn)  # [B, H_kv, n]
        capacity = self.buffer.shape[-2]
        base = (torch.arange(bsz * n_kv, device=idx.device) * capacity).view(bsz, n_kv, 1)
        values = self.fetch(self.buffer, base + idx)  # [B, H_kv, n, d]
        self.count(bsz * n_kv * topn, bsz * n_kv * total)
        weights = probs.gather(-1, idx[:, :, None, :].expand(bsz, n_kv, m, topn))
        if valid_count is None:
            return estimate(weights, values, None, None)
        return estimate(weights, values, self.sums, valid_count.expand(bsz, n_kv)).to(values.dtype)


def estimate(weights: torch.Tensor, values: torch.Tensor, sums: torch.Tensor | None,
             valid_count: torch.Tensor | None) -> torch.Tensor:
    """The attention output from the rows a decode step read.

    Args:
        weights: float ``[..., M, n]``: the exact probabilities of the ``n`` selected slots for ``M`` query heads
            (× queries) sharing one selection (0 for a selected slot that holds no real token).
        values: ``[..., n, d]`` the selected rows (zero where no real token).
        sums / valid_count: ``residual_mean``: float32 ``[..., d]`` the sum of every value the (row, KV head) holds
            and int64 ``[...]`` how many real tokens it holds; both None: ``renormalise``.

    Returns:
        ``renormalise``: ``weights @ values / sum(weights)``, in ``values``' dtype. ``residual_mean`` (float32):
        ``weights @ values + (1 - sum(weights)) * mean`` of the unselected real rows ``(sums - sum of the selected
        real rows) / (valid_count - selected real rows)``; a selected slot counts as real when some query head gives
        it a probability above 0 (so the two estimates agree when a step misses no mass).
    """
    if sums is None:
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(weights.dtype).tiny)
        return torch.matmul(weights.to(values.dtype), values)
    weights = weights.float()
    values = values.float()
    real = weights.sum(dim=-2) > 0  # [..., n]
    rest_count = (valid_count - real.sum(dim=-1)).clamp(min=1)  # [...]
    rest_mean = (sums - (values * real[..., None]).sum(dim=-2)) / rest_count[..., None]  # [..., d]
    missed = (1.0 - weights.sum(dim=-1, keepdim=True)).clamp(min=0.0)  # [..., M, 1]
    return torch.matmul(weights, values) + missed * rest_mean[..., None, :]


class OffloadedLayer(RowSelection, DynamicLayer, PlanLayer):
    """A layer that keeps every token, keys with the model and values in a :class:`ValueStore` (KCache alone).

    ``keys`` ``[B, H_kv, T, d]`` grow like transformers' ``DynamicLayer``; ``values`` stays ``None`` once the prefill
    is done (they are in ``store``). Decode steps read ``topn`` value rows per (row, KV head); see the module doc.
    """

    def __init__(self, topn: int, readers: int = 0, estimator: str = "residual_mean"):
        super().__init__()
        if int(topn) < 1:
            raise ValueError(f"an OffloadedLayer reads at least one value row per step, not topn={topn}")
        check_estimator(estimator)
        self.topn = int(topn)
        self.estimator = estimator
        self.readers = readers
        self.store: ValueStore | None = None
        self._fresh: torch.Tensor | None = None  # the prefill's values, with the model until every reader attended
        self._valid: torch.Tensor | None = None  # bool [B, 1, T] the prefill's real tokens (padding is not)
        self._readers_left = 0
        self.offloaded = False

    # ----- transformers' layer protocol -------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor, *args) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.store = ValueStore(key_states.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        # copies, as DynamicLayer's cat makes: the model's tensors may be views of a larger (fused) buffer
        self.keys = key_states.clone() if self.keys is None else torch.cat([self.keys, key_states], dim=-2)
        if not self.offloaded:
            self._fresh = value_states.clone() if self._fresh is None else torch.cat([self._fresh, value_states], -2)
            return self.keys, self._fresh
        self.store.append(value_states)
        return self.keys, value_states  # kvplan's attention reads the store, not these

    def current_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys, (self._fresh if not self.offloaded else self.store.view())

    def get_seq_length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    def reset(self) -> None:
        self.keys = self.values = None
        self._fresh = self._valid = None
        if self.store is not None:
            self.store.clear()
        self.offloaded = False
        self._readers_left = 0
        self.is_initialized = False

    def crop(self, *args, **kwargs) -> None:
        raise NotImplementedError(
            "a KCache layer cannot be cropped (assisted/speculative decoding); generate without an assistant model "
            "while a plan is applied"
        )

    def _select_rows(self, fn) -> None:
        if self.keys is not None:
            self.keys = fn(self.keys)
        if self._fresh is not None:
            self._fresh = fn(self._fresh)
        if self._valid is not None:
            self._valid = fn(self._valid)
        if self.offloaded:
            self.store.select_rows(fn)

    def join_rows(self, others: list) -> None:
        parts = [self, *others]
        check_same(parts, "is_initialized", "offloaded", "_readers_left")
        self.keys = cat_rows([part.keys for part in parts])
        self._fresh = cat_rows([part._fresh for part in parts])
        self._valid = cat_rows([part._valid for part in parts])
        if self.store is not None:
            self.store.join_rows([part.store for part in others])

    # ----- the plan-layer interface -------------------------------------------------------------------------------
    def held(self) -> Held:
        if self.keys is None:
            raise RuntimeError("kvplan: the layer has not cached anything yet")
        values = self._fresh if not self.offloaded else self.store.to_model(self.store.view())
        return Held(self.keys, values)

    def holds_anything(self) -> bool:
        return self.keys is not None and self.keys.numel() > 0

    def physical_bytes(self, by_device: bool = False):
        store = (*self.store.tensors(), *self.store.resident()) if self.store is not None else ()
        return tensor_bytes((self.keys, self._fresh, *store), by_device)

    def value_stores(self) -> list[ValueStore]:
        return [self.store] if self.store is not None else []

    def kept_lengths(self) -> torch.Tensor:
        if not self.holds_anything():
            return torch.zeros(0, 0, dtype=torch.int64)
        bsz, heads, width, _ = self.keys.shape
        return torch.full((bsz, heads), width, dtype=torch.int64)

    # ----- attention ----------------------------------------------------------------------------------------------
    def attention(self, query: torch.Tensor, mask: torch.Tensor | None, scaling: float, exact) -> torch.Tensor:
        if not self.offloaded:
            out = exact(self.keys, self._fresh)
            bsz, _, total, _ = self.keys.shape
            self._valid = key_valid_from_mask(mask, bsz, total, self.keys.device)[:, None]  # [B, 1, T]
            self._readers_left = self.readers
            if self.readers == 0:
                self._offload()
            return out
        return self._decode(query, mask, scaling, exact)

    def reader_attention(self, query, mask, scaling, exact) -> torch.Tensor:
        if not self.offloaded:
            if self._readers_left <= 0:
                raise RuntimeError("kvplan: a sharing layer attended before its source layer in this forward pass")
            out = exact(self.keys, self._fresh)
            self._readers_left -= 1
            if self._readers_left == 0:
                self._offload()
            return out
        return self._decode(query, mask, scaling, exact)

    def check_forward(self, layer_idx: int, where: str) -> None:
        if self._fresh is not None and self._readers_left > 0:
            raise RuntimeError(
                f"kvplan: layer {layer_idx} waited for sharing layers that never attended over its cache in this "
                f"forward pass ({where}); please report it with the model id"
            )
        if self._fresh is not None and self.keys is not None and not self.offloaded:
            raise RuntimeError(
                f"kvplan: layer {layer_idx} cached tokens without going through kvplan's attention function; this "
                f"architecture ({where}) does not pass keyword arguments down to attention, so the plan cannot be "
                "applied to it. Please report it with the model id."
            )

    def _offload(self) -> None:
        """Move the prefill's values to the store (padding slots zeroed) and free the model-side copy."""
        self.store.put(self._fresh, valid=self._valid)
        self._fresh = self._valid = None
        self.offloaded = True

    def _decode(self, query: torch.Tensor, mask: torch.Tensor | None, scaling: float, exact) -> torch.Tensor:
        """One step after the prefill: top-N over the store for a single new token, exact over all rows otherwise."""
        bsz, n_q_heads, q_len, dim = query.shape
        total = self.keys.shape[2]
        if q_len != 1 or self.topn >= total:
            return exact(self.keys, self.store.read_all())
        n_kv = self.keys.shape[1]
        groups = n_q_heads // n_kv
        q = query.reshape(bsz, n_kv, groups, dim)
        logits = torch.matmul(q, self.keys.transpose(-1, -2))  # [B, H_kv, G, T]
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        logits = logits * scaling
        if mask is not None:
            logits = logits.masked_fill(~mask[:, :, -1:, :], NEG_INF)  # [B|1, 1, 1, T] broadcasts over heads
        probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
        count = None
        if self.estimator == "residual_mean":
            real = mask[:, 0, -1, :] if mask is not None else None  # [B | 1, T]
            count = torch.full((1, 1), total, device=probs.device) if real is None else real.sum(-1, keepdim=True)
        out = self.store.topn_output(probs, self.topn, count)  # [B, H_kv, G, d]
        return out.to(query.dtype).reshape(bsz, n_q_heads, 1, dim).transpose(1, 2).contiguous()


# ----------------------------------------------------------------------------------------------------------
# The registration: plan schema, parameters, runtime hook
# ----------------------------------------------------------------------------------------------------------


def _check_topn(values: torch.Tensor, context: TensorContext) -> str | None:
    """``0`` means all values are read."""
    if bool((values < 0).any()):
        return "values must be >= 0"
    return None


def _check_error(values: torch.Tensor, context: TensorContext) -> str | None:
    if bool((values < 0).any()) or not bool(torch.isfinite(values).all()):
        return "values must be finite and >= 0"
    return None


def configure(plan, layers: list[LayerPlan], config) -> None:
    """Give every full-attention layer with ``topn > 0`` its N (sharing layers read their source's store; sliding
    layers keep their values: their window already bounds them)."""
    topn = plan.tensors["kcache.topn"].tolist()
    estimator = METHOD.read_params(plan.params.get("kcache", {}))["estimator"]
    for layer, n in zip(layers, topn):
        if layer.kind == "full_attention" and int(n) > 0:
            layer.topn = int(n)
            layer.topn_estimator = estimator


METHOD = MethodSpec(
    name="kcache",
    description="KCache: keys stay with the model, values live in a second store and each decode step reads only "
    "the top-N attended value rows",
    tensors=(
        TensorSpec("kcache.topn", torch.int32, ("L",), _check_topn,
                   "value rows each decode step reads per (row, KV head); 0 = the layer keeps its values with the "
                   "model and reads all"),
        TensorSpec("kcache.output_error", torch.float32, ("L",), _check_error,
                   "calibration: relative error of the attention output at the chosen top-N (0 where topn = 0)",
                   required=False),
    ),
    params=(
        ParamSpec("estimator", "str", "residual_mean", "how a decode step estimates the output from the top-N rows "
                  "it read: residual_mean (the mass it missed goes to the mean of the unread rows, known from a "
                  "resident per-(row, KV head) value sum) or renormalise (softmax renormalised over the rows read)",
                  choices=ESTIMATORS),
        ParamSpec("tolerance", "float", 0.01, "calibration: largest mean relative error of a layer's attention "
                  "output (top-N vs all values) a layer's N may cause", minimum=0.0, maximum=1.0,
                  stage="calibration"),
        ParamSpec("queries", "int", 64, "calibration: last queries of each sample whose top-N output is measured",
                  minimum=1, stage="calibration"),
        ParamSpec("flat_fraction", "float", 0.5, "calibration: a layer whose N would exceed this fraction of the "
                  "calibration context keeps its values with the model (topn = 0)", minimum=0.0, maximum=1.0,
                  stage="calibration"),
    ),
    configure=configure,
    calibration_step="calibrate.kcache:calibration_step",
    calibration_order=3,
    card_column=("top-n values", "kcache.topn", lambda row: "all" if row == 0 else str(row)),
)

__all__ = ["ESTIMATORS", "METHOD", "OffloadedLayer", "ValueStore", "estimate", "store_device_for", "top_slots"]
