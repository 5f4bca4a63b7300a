"""Per-head bounded KV cache for ``generate()``: a ``transformers.Cache`` made of our own layer objects.

A KV head whose query heads all have a bounded span keeps only its sink tokens plus the recent window the
next query can still see (``sink_eff + window - 1`` slots); a KV head with any dense query head keeps
everything. KV heads of a layer are stored in groups (dense, and one group per bounded capacity), each a
contiguous ``(B, Hg, L, D)`` tensor with a ``pos`` tensor of real token positions (-1 = empty slot). RoPE is
applied before caching, so slot order does not matter.

The cache is storage; the attention function (``compressor.patching``) owns the policy: it calls
:meth:`PlanCacheLayer.store`, :meth:`attend` and :meth:`evict`. ``update`` only passes the new states through.
Spans are evaluated once per sequence at the prefill length ``n0`` and held fixed while decoding.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from kernels.reference import masked_attention, repeat_kv
from plans.span import sees


EVICT_SLACK = 32  # decode steps between compactions of a bounded group


class PlanCacheLayer(CacheLayerMixin):
    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, n_rep: int):
        super().__init__()
        self.n_rep = n_rep
        self.cum = 0  # cache slots ever seen (pads included), what HF masks index
        self.groups: list[dict] = []
        self.n_real: torch.Tensor | None = None  # (B,) real tokens seen per sample
        self.sink_q: torch.Tensor | None = None  # (B, Hq) effective sink per query head
        self.window_q: torch.Tensor | None = None  # (B, Hq) window per query head (huge = dense)

    # -- CacheLayerMixin --------------------------------------------------------------------------------
    def lazy_initialization(self, key_states, value_states, *args, **kwargs):
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cum += key_states.shape[-2]
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.cum

    def get_mask_sizes(self, query_length: int, *args, **kwargs) -> tuple[int, int]:
        return self.cum + query_length, 0

    def get_max_length(self) -> int:
        return -1

    @property
    def has_states(self) -> bool:
        return bool(self.groups)

    def nbytes(self) -> int:
        return sum(g["state"].nbytes() if "state" in g else g["k"].nbytes + g["v"].nbytes for g in self.groups)

    def _index_batch(self, fn):
        from kernels.operators import LinearState

        for g in self.groups:
            if "state" in g:
                g["state"] = LinearState(fn(g["state"].S), fn(g["state"].count))
                continue
            for key in ("k", "v", "pos"):
                g[key] = fn(g[key])
        for name in ("n_real", "sink_q", "window_q"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._index_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._index_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._index_batch(lambda t: t[indices, ...])

    def reset(self) -> None:
        self.cum, self.groups, self.n_real, self.sink_q, self.window_q = 0, [], None, None, None

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("a bounded per-head cache cannot be cropped (evicted tokens are gone)")

    # -- policy hooks used by the attention function ---------------------------------------------------
    def store(self, keys, values, k_pos, sink_q, window_q, dense_kv: torch.Tensor, linear_kv: torch.Tensor | None = None):
        """Keep the prefill's keys/values: (B, Hkv, N, D), real positions k_pos (B, N) (-1 = pad).

        sink_q/window_q (B, Hq) per query head; dense_kv (Hkv,) bool marks KV heads that never evict;
        linear_kv (Hkv,) bool marks KV heads whose query heads are all linear: they keep only a D x D state.
        """
        from kernels.operators import LinearState

        b, hkv = keys.shape[:2]
        self.sink_q, self.window_q = sink_q, window_q
        self.n_real = (k_pos >= 0).sum(-1)
        pos = k_pos[:, None, :].expand(b, hkv, -1)
        caps = self._capacities(dense_kv)
        self.groups = []
        if linear_kv is not None and bool(linear_kv.any()):
            idx = linear_kv.nonzero().flatten().to(keys.device)
            self.groups.append({"kv": idx, "dense": True, "linear": True,
                                "state": LinearState.from_prefill(keys.index_select(1, idx), values.index_select(1, idx),
                                                                  k_pos >= 0)})
            caps = [None if bool(linear_kv[h]) else c for h, c in enumerate(caps)]
        for cap in sorted({c for c in caps if c is not None}):
            idx = torch.tensor([h for h in range(hkv) if caps[h] == cap], device=keys.device)
            self.groups.append(
                {"kv": idx, "dense": cap < 0, "cap": cap, "k": keys.index_select(1, idx),
                 "v": values.index_select(1, idx), "pos": pos.index_select(1, idx).contiguous()}
            )
        self.evict(force=True)

    def _capacities(self, dense_kv):
        hkv = dense_kv.numel()
        sink_kv, window_kv = self._kv_limits()
        caps = []
        for h in range(hkv):
            caps.append(-1 if bool(dense_kv[h]) else int((sink_kv[:, h] + window_kv[:, h]).max()))
        return caps

    def _kv_limits(self):
        b, hq = self.sink_q.shape
        sink_kv = self.sink_q.view(b, hq // self.n_rep, self.n_rep).amax(-1)
        window_kv = self.window_q.view(b, hq // self.n_rep, self.n_rep).amax(-1)
        return sink_kv, window_kv

    def append(self, keys, values, new_pos):
        """Add new tokens (B, Hkv, q, D) with real positions new_pos (B, q) to every group."""
        self.n_real = self.n_real + (new_pos >= 0).sum(-1)
        for g in self.groups:
            idx = g["kv"]
            if "state" in g:  # consumed by attend()
                g["new"] = (keys.index_select(1, idx), values.index_select(1, idx), new_pos >= 0)
                continue
            g["k"] = torch.cat([g["k"], keys.index_select(1, idx)], dim=2)
            g["v"] = torch.cat([g["v"], values.index_select(1, idx)], dim=2)
            p = new_pos[:, None, :].expand(-1, idx.numel(), -1)
            g["pos"] = torch.cat([g["pos"], p], dim=2)

    def attend(self, query, q_pos, scale, native_window: int | None = None, relu_heads=(), linear_heads=(), *,
               softcap: float | None = None, s_aux: torch.Tensor | None = None, dropout: float = 0.0):
        """Attention of new queries (B, Hq, q, D) at real positions q_pos (B, q) over the kept slots.

        ``relu_heads`` use relu-softmax over the same slots; ``linear_heads`` (their KV heads keep every token)
        use causal linear attention over all kept slots. ``softcap``, ``s_aux`` (Hq,) and ``dropout`` are the
        model features of :func:`kernels.reference.masked_attention`.
        """
        from kernels.operators import linear_attention, linear_decode_step, relu_softmax_attention

        out = torch.empty_like(query)
        relu_heads, linear_heads = set(relu_heads), set(linear_heads)
        for g in self.groups:
            qi = (g["kv"][:, None] * self.n_rep + torch.arange(self.n_rep, device=query.device)).flatten()
            if "state" in g:
                k_new, v_new, valid_new = g.pop("new")
                o, g["state"] = linear_decode_step(g["state"], query.index_select(1, qi), k_new, v_new, scale,
                                                   k_valid=valid_new)
                out[:, qi] = o.to(out.dtype)
                continue
            pos = g["pos"].repeat_interleave(self.n_rep, dim=1)  # (B, Hqg, L)
            sink = self.sink_q.index_select(1, qi)[:, :, None, None]
            window = self.window_q.index_select(1, qi)[:, :, None, None]
            kp, qp = pos[:, :, None, :], q_pos[:, None, :, None]
            valid = kp >= 0
            ok = valid & sees(qp, kp, sink, window)
            if native_window is not None:
                ok = ok & (qp - kp < native_window)
            ok = ok | (~ok.any(-1, keepdim=True) & valid)  # padding query rows: any valid key, never NaN
            qg, kg, vg = query.index_select(1, qi), repeat_kv(g["k"], self.n_rep), repeat_kv(g["v"], self.n_rep)
            o = masked_attention(qg, kg, vg, ok, scale, softcap=softcap,
                                 s_aux=None if s_aux is None else s_aux.index_select(0, qi), dropout=dropout)
            for r, h in enumerate(qi.tolist()):
                if h in relu_heads:
                    o[:, r] = relu_softmax_attention(qg[:, r : r + 1], kg[:, r : r + 1], vg[:, r : r + 1], ok[:, r : r + 1], scale)[:, 0]
                elif h in linear_heads:  # a keep-all group: slots are in token order, queries are the last ones
                    o[:, r] = linear_attention(qg[:, r : r + 1], kg[:, r : r + 1], vg[:, r : r + 1], scale,
                                               k_valid=pos[:, r] >= 0)[:, 0]
            out[:, qi] = o
        return out

    def evict(self, force: bool = False):
        """Drop slots no future query can see: not a sink and older than every window of the KV head.

        While decoding, a group is compacted only once it holds ``EVICT_SLACK`` slots beyond its capacity, so the
        gather runs every EVICT_SLACK steps instead of every step (the mask already hides stale slots)."""
        sink_kv, window_kv = self._kv_limits()
        cur = (self.n_real - 1)[:, None, None]
        for g in self.groups:
            if g["dense"] or (not force and g["pos"].shape[-1] < g["cap"] + EVICT_SLACK):
                continue
            s = sink_kv.index_select(1, g["kv"])[:, :, None]
            w = window_kv.index_select(1, g["kv"])[:, :, None]
            pos = g["pos"]
            keep = (pos >= 0) & ((pos < s) | (pos >= cur + 2 - w))
            n_keep = int(keep.sum(-1).max()) if keep.numel() else 0
            if n_keep == pos.shape[-1] and bool(keep.all()):
                continue
            order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)[..., :n_keep]
            g["pos"] = torch.where(keep.gather(-1, order), pos.gather(-1, order), torch.full_like(order, -1))
            gi = order[..., None].expand(-1, -1, -1, g["k"].shape[-1])
            g["k"], g["v"] = g["k"].gather(2, gi), g["v"].gather(2, gi)


class PlanCache(Cache):
    """``generate(..., past_key_values=PlanCache(model))`` keeps per-head bounded KV for a patched model."""

    def __init__(self, model):
        from compressor.patching import install_cache_hooks, text_geometry

        layers, hq, hkv = text_geometry(model.config)
        install_cache_hooks(model)
        super().__init__(layers=[PlanCacheLayer(hq // hkv) for _ in range(layers)])

    def nbytes(self) -> int:
        """Bytes of K/V held now."""
        return sum(layer.nbytes() for layer in self.layers)


def dense_cache_bytes(model, seq_len: int, batch: int = 1, dtype=None) -> int:
    """Bytes a DynamicCache would hold for ``seq_len`` tokens (K and V, every layer, every KV head)."""
    from plans.identity import identity_from_config

    ident = identity_from_config(model.config)
    dt = dtype or next(model.parameters()).dtype
    return 2 * ident.num_layers * batch * ident.num_kv_heads * seq_len * ident.head_dim * torch.empty((), dtype=dt).element_size()
