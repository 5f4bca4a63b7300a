"""An independent oracle for the run-time semantics tests: explicit masked eager attention.

Nothing here imports the code under test's span or mask logic: spans come from the plan's raw fields through the
rule written out below, and the mask is built entry by entry from real positions. The oracle only handles
uncached forwards (queries == keys), which is what "uncached recomputation" means in the tests.

Rule (issue 10 §1): ``S = span(N0 + length_offset)`` with
``span(N) = round_up(clamp(floor(alpha + beta*N), min_span, max_span), block)`` (never capped by N),
``sink_eff = min(sink, S - 1)``; query i sees key j iff ``j <= i and (j < sink_eff or i - j < S - sink_eff)``.
"""

from __future__ import annotations

import math

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ORACLE = "runtime_oracle"
STATE: dict = {}  # plan, n0 (B,), pos (B, N) real positions (-1 = pad), spans_fn (optional override)


def rule_span(p, n_rule: int) -> int:
    """The span rule written out independently of plans.span."""
    s = math.floor(p.alpha + p.beta * n_rule + 1e-9)
    if p.min_span is not None:
        s = max(s, p.min_span)
    if p.max_span is not None:
        s = min(s, p.max_span)
    s = -(-s // p.block) * p.block
    return max(1, s)


def head_rule(plan, layer: int, q_head: int, n0: int) -> tuple[int, int] | None:
    """(sink_eff, window) for one query head at prompt length n0; None for a dense head."""
    if STATE.get("head_rule") is not None:
        return STATE["head_rule"](layer, q_head, n0)
    h = q_head if plan.granularity == "query_head" else q_head // plan.model.group_size
    p = plan.layers[layer].heads[h]
    if p.kind != "sink_window":
        return None
    s = rule_span(p, n0 + plan.length_offset)
    sink = min(p.sink, s - 1)
    return sink, s - sink


def oracle_attention(module, q, k, v, attention_mask, scaling=None, dropout=0.0, **kw):
    b, hq, n, d = q.shape
    assert k.shape[2] == n, "the oracle runs uncached forwards only"
    rep = hq // k.shape[1]
    plan, n0 = STATE["plan"], STATE["n0"]
    pos = STATE.get("pos")
    if pos is None:
        pos = torch.arange(n).expand(b, n)
    if attention_mask is None:
        hf = torch.ones(n, n, dtype=torch.bool).tril().expand(b, 1, n, n)
    elif attention_mask.dtype == torch.bool:
        hf = attention_mask
    else:
        hf = attention_mask > torch.finfo(attention_mask.dtype).min / 2
    i, j = pos[:, :, None], pos[:, None, :]  # (B, N, 1), (B, 1, N)
    out = torch.zeros_like(q)
    cap = kw.get("softcap")
    for h in range(hq):
        ok = hf[:, 0] & (j <= i) & (j >= 0) & (i >= 0)
        for bi in range(b):
            rule = head_rule(plan, module.layer_idx, h, int(n0[bi]))
            if rule is not None:
                sink, window = rule
                ok[bi] &= (j[bi] < sink) | (i[bi] - j[bi] < window)
        s = (q[:, h].double() @ k[:, h // rep].double().transpose(-1, -2)) * scaling
        if cap is not None:
            s = torch.tanh(s / cap) * cap
        s = s.masked_fill(~ok, -math.inf)
        p = torch.softmax(s, -1).nan_to_num(0.0)
        out[:, h] = (p @ v[:, h // rep].double()).to(q.dtype)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ORACLE, oracle_attention)
AttentionMaskInterface.register(ORACLE, sdpa_mask)


def oracle_logits(model, plan, ids, *, n0=None, attention_mask=None, position_ids=None, pos=None, head_rule_fn=None):
    """Logits of ``model`` with the oracle in place of its attention (restores the implementation after)."""
    b, n = ids.shape
    if pos is None and attention_mask is not None and attention_mask.ndim == 2:
        am = attention_mask.bool()
        pos = torch.where(am, am.long().cumsum(-1) - 1, -1)
    if n0 is None:
        n0 = (pos >= 0).sum(-1) if pos is not None else torch.full((b,), n)
    STATE.update(plan=plan, n0=torch.as_tensor(n0).expand(b), pos=pos, head_rule=head_rule_fn)
    impl = model.config._attn_implementation
    model.set_attn_implementation(ORACLE)
    try:
        with torch.no_grad():
            kw = {} if position_ids is None else {"position_ids": position_ids}
            return model(ids, attention_mask=attention_mask, use_cache=False, **kw).logits
    finally:
        model.set_attn_implementation(impl)


def oracle_greedy(model, plan, ids, steps: int, *, n0=None, head_rule_fn=None) -> torch.Tensor:
    """Greedy decoding by uncached recomputation under the oracle, N0 fixed at the prompt length."""
    n0 = ids.shape[1] if n0 is None else n0
    seq = ids
    for _ in range(steps):
        logits = oracle_logits(model, plan, seq, n0=n0, head_rule_fn=head_rule_fn)
        seq = torch.cat([seq, logits[:, -1:].argmax(-1)], dim=1)
    return seq
