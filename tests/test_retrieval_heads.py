"""Retrieval-head scores (profilers.retrieval, compressor.hf.retrieval_attention, compressor.retrieval_profile) and
the kept-dense search shape (search_space.keep_dense), each against an independent computation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from compressor.retrieval_profile import RetrievalArgs, item_needle_mass, retrieval_items, run_retrieval_profile
from plans.errors import CompressError
from profilers.retrieval import (
    RetrievalScores,
    kv_head_scores,
    load_retrieval,
    needle_attention_mass,
    ranking_agreement,
    save_retrieval,
    top_heads,
)
from search_space.budgets import parse_budgets
from search_space.keep_dense import check_kept_dense, fit_keep_dense_plan, force_dense, keep_dense_plan, largest_keep_dense
from search_space.problem import build_problem, solve_problem
from tests.conftest import tiny_model_with_tokenizer
from tests.test_search_synthetic import make_profile


def _explicit_mass(q, k, scaling, rows, needle):
    """Full N x N causal softmax (repeat_kv order), then the needle columns of the chosen rows."""
    hq, hkv = q.shape[0], k.shape[0]
    kk = k.repeat_interleave(hq // hkv, dim=0).double()
    n = k.shape[1]
    s = torch.einsum("hid,hjd->hij", q.double(), kk) * scaling
    s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    a = torch.softmax(s, -1)
    return a[:, rows][..., needle[0]:needle[1]].sum(-1).mean(-1)


@pytest.mark.parametrize("hq,hkv", [(4, 2), (6, 1), (3, 3)])
def test_needle_mass_matches_full_attention(hq, hkv):
    g = torch.Generator().manual_seed(hq * 10 + hkv)
    n, d = 40, 8
    q_all = torch.randn(hq, n, d, generator=g)
    k = torch.randn(hkv, n, d, generator=g)
    rows = torch.tensor([5, 17, 38, 39])
    needle = (3, 9)
    got = needle_attention_mass(q_all[:, rows], k, 0.35, rows, needle)
    want = _explicit_mass(q_all, k, 0.35, rows, needle)
    assert torch.allclose(got, want, atol=1e-6)
    # a row before the needle sees none of it
    early = needle_attention_mass(q_all[:, :2], k, 0.35, torch.tensor([0, 1]), needle)
    assert torch.all(early == 0)


def test_needle_mass_refuses_bad_input():
    q, k = torch.randn(4, 2, 8), torch.randn(2, 10, 8)
    with pytest.raises(CompressError, match="outside"):
        needle_attention_mass(q, k, 1.0, torch.tensor([8, 9]), (5, 11))
    with pytest.raises(CompressError, match="multiple"):
        needle_attention_mass(torch.randn(3, 2, 8), k, 1.0, torch.tensor([8, 9]), (1, 2))
    with pytest.raises(CompressError, match="positions"):
        needle_attention_mass(q, k, 1.0, torch.tensor([8]), (1, 2))


def test_kv_scores_top_heads_and_agreement():
    per_q = torch.tensor([[0.1, 0.3, 0.9, 0.7], [0.0, 0.2, 0.4, 0.4]])
    kv = kv_head_scores(per_q, 2)
    assert torch.allclose(kv, torch.tensor([[0.2, 0.8], [0.1, 0.4]]))
    assert top_heads(kv, 2) == [(0, 1), (1, 1)]
    agree = ranking_agreement(kv, kv * 2 + 1, 2)
    assert agree["spearman"] == pytest.approx(1.0) and agree["top_k_overlap"] == 2
    with pytest.raises(CompressError):
        top_heads(kv, 5)


def test_probe_matches_eager_attention_weights():
    """The hook's mass == the same sum over HF eager attention weights (output_attentions) of the same prompt."""
    model, tok = tiny_model_with_tokenizer("llama", seed=3)
    item = retrieval_items(tok, [256], 2, seed=1, corpus=None)[0]
    got = item_needle_mass(model, item, query_rows=5)  # [L, Hq]
    model.set_attn_implementation("eager")
    with torch.no_grad():
        out = model(input_ids=torch.tensor([item.prompt_ids]), output_attentions=True)
    s, e = item.anchor.span
    n = len(item.prompt_ids)
    want = torch.stack([a[0, :, n - 5:, s:e].sum(-1).mean(-1).double() for a in out.attentions])
    assert got.shape == want.shape == (2, 4)
    assert torch.allclose(got, want, atol=1e-5)
    assert model.config._attn_implementation == "eager"  # the probe restored what it found


def test_retrieval_profile_round_trip(tmp_path):
    model, tok = tiny_model_with_tokenizer("llama", seed=4)
    r = run_retrieval_profile(model, tok, RetrievalArgs(lengths=[320], samples=4, corpus=None), show_progress=False)
    assert r.scores.shape == (2, 2) and r.halves.shape == (2, 2, 2)
    assert torch.allclose(r.halves.mean(0), r.scores, atol=1e-12)  # equal halves: the mean of means
    assert torch.all((r.scores >= 0) & (r.scores <= 1))
    save_retrieval(r, tmp_path / "retr")
    back = load_retrieval(tmp_path / "retr.json")
    assert torch.equal(back.scores, r.scores.double()) and back.meta["samples_per_length"] == 4
    with pytest.raises(CompressError, match="not found"):
        load_retrieval(tmp_path / "nothing")
    with pytest.raises(CompressError, match="at least 2"):
        run_retrieval_profile(model, tok, RetrievalArgs(lengths=[320], samples=1, corpus=None), show_progress=False)


def test_retrieval_items_are_not_eval_items():
    from compressor.fidelity import FidelityGrid, make_cell_items
    from profilers.data import ruler

    _, tok = tiny_model_with_tokenizer("llama")
    mine = retrieval_items(tok, [256], 3, seed=0, corpus=None)
    grid = FidelityGrid(tasks=["niah_single"], lengths=[256], n_per_cell=6, seed=0, style="plain", haystack="noise")
    theirs = make_cell_items("niah_single", tok, 256, grid, "plain", ruler.NOISE)
    assert not {tuple(i.prompt_ids) for i in mine} & {tuple(i.prompt_ids) for i in theirs}
    assert not {i.answers[0] for i in mine} & {i.answers[0] for i in theirs}


# -- kept-dense shape ----------------------------------------------------------------------------------------


def _density_by_counting(plan, n):
    """Kept causal entries / all causal entries, by building every head's mask (span rule of plans/span.py)."""
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    kept = total = 0
    for layer in plan.layers:
        for h in layer.heads:
            if h.kind == "dense":
                m = j <= i
            else:
                S = h.span(n)
                sink = min(h.sink, S - 1)
                m = (j <= i) & ((j < sink) | (i - j < S - sink))
            kept += int(m.sum())
            total += n * (n + 1) // 2
    return kept / total


def test_largest_keep_dense_is_the_largest_feasible():
    prof = make_profile(n_layers=4, n_heads=4, n_kv=2)
    ident = prof.meta.model
    ranked = [(3, 1), (0, 0), (2, 1), (1, 0), (0, 1), (1, 1), (2, 0), (3, 0)]
    budgets = parse_budgets("density@1024=0.45")
    k = largest_keep_dense(ident, ranked, budgets, [1024], span=128, sink=32)
    assert 0 < k < len(ranked)
    assert _density_by_counting(keep_dense_plan(ident, ranked[:k], 128, 32), 1024) <= 0.45 + 1e-9
    assert _density_by_counting(keep_dense_plan(ident, ranked[:k + 1], 128, 32), 1024) > 0.45
    assert largest_keep_dense(ident, ranked, parse_budgets("density@1024=0.01"), [1024], span=128, sink=32) == 0
    plan = fit_keep_dense_plan(ident, ranked, budgets, [1024], span=128, sink=32)
    assert [(li, h) for li, layer in enumerate(plan.layers) for h, p in enumerate(layer.heads) if p.kind == "dense"] \
        == sorted(ranked[:k]) and plan.budgets == budgets
    with pytest.raises(CompressError, match="lower --local-span"):
        fit_keep_dense_plan(ident, ranked, parse_budgets("density@1024=0.01"), [1024], span=128, sink=32)


def test_per_layer_spans_are_largest_feasible_by_counting():
    prof = make_profile(n_layers=4, n_heads=4, n_kv=2)
    ident = prof.meta.model
    ranked = [(3, 1), (0, 0), (2, 1), (1, 0), (0, 1), (1, 1), (2, 0), (3, 0)]
    spans = [64, 256, 128, 512]
    plan = keep_dense_plan(ident, ranked[:2], spans, 32)
    assert [h.span(1024) for layer in plan.layers for h in layer.heads if h.kind != "dense"] == [64, 256, 256, 128, 128, 512]
    budgets = parse_budgets("density@1024=0.5")
    k = largest_keep_dense(ident, ranked, budgets, [1024], span=spans, sink=32)
    assert _density_by_counting(keep_dense_plan(ident, ranked[:k], spans, 32), 1024) <= 0.5 + 1e-9
    assert k == len(ranked) or _density_by_counting(keep_dense_plan(ident, ranked[:k + 1], spans, 32), 1024) > 0.5
    with pytest.raises(CompressError, match="3 spans for 4 layers"):
        keep_dense_plan(ident, [], [64, 64, 64], 32)


def test_force_dense_keeps_heads_dense_and_is_optimal_around_them():
    prof = make_profile(n_layers=2, n_heads=4, n_kv=2, lengths=(512,))
    prob = build_problem(prof, "density@512=0.75", sinks=[32], grid="block")
    kept = [(0, 1), (1, 0)]
    forced = force_dense(prob, kept)
    res = solve_problem(forced, K=None, time_limit=30)
    dense = next(i for i, c in enumerate(prob.candidates) if c.kind == "dense")
    assert res.assignment[1] == dense and res.assignment[2] == dense
    check_kept_dense(forced.plan(res.assignment), kept)
    # brute force over the two free heads (the others fixed dense): the same optimum
    rows = prob.rows()
    best = None
    for a, b in itertools.product(range(len(prob.candidates)), repeat=2):
        x = np.array([a, dense, dense, b])
        if all((r.cost[np.arange(4), x].sum() <= r.upper + 1e-9) and (r.lower is None or r.cost[np.arange(4), x].sum()
               >= r.lower - 1e-9) for r in rows):
            v = sum(prob.loss[512][np.arange(4), x])
            best = v if best is None else min(best, v)
    got = prob.loss[512][np.arange(4), res.assignment].sum()
    assert best is not None and got == pytest.approx(best, rel=1e-6, abs=1e-9)
    with pytest.raises(CompressError, match="outside"):
        force_dense(prob, [(5, 0)])
    # at density 0.6 two dense heads leave too little for the other two (cheapest candidate 0.23 each)
    tight = build_problem(prof, "density@512=0.6", sinks=[32], grid="block")
    res = solve_problem(force_dense(tight, kept), K=None, time_limit=30)
    with pytest.raises(CompressError, match="cannot stay dense"):
        check_kept_dense(tight.plan(res.assignment), kept)


def test_retrieval_scores_reject_bad_files(tmp_path):
    r = RetrievalScores(torch.rand(2, 2), torch.rand(2, 2, 2), {})
    save_retrieval(r, tmp_path / "r")
    (tmp_path / "r.json").write_text("{not json")
    with pytest.raises(CompressError, match="cannot read"):
        load_retrieval(tmp_path / "r")


# -- the CLI path ------------------------------------------------------------------------------------------------


def test_cli_search_keeps_top_retrieval_heads_dense(tmp_path):
    from typer.testing import CliRunner

    from compressor.cli import app
    from plans.io import load_plan
    from profilers.profile_format import save_profile

    prof = make_profile(n_layers=4, n_heads=4, n_kv=2, lengths=(512, 1024))
    save_profile(prof, tmp_path / "profile")
    scores = torch.tensor([[0.1, 0.9], [0.05, 0.3], [0.7, 0.2], [0.4, 0.01]], dtype=torch.float64)
    save_retrieval(RetrievalScores(scores, torch.stack([scores, scores]), {}), tmp_path / "retr")
    ranked = [(0, 1), (2, 0), (3, 0), (1, 1), (2, 1), (0, 0), (1, 0), (3, 1)]
    assert top_heads(scores, 8) == ranked
    r = CliRunner().invoke(app, ["search", "--profile", str(tmp_path / "profile"), "--budget", "density@1024=0.5",
                                 "--retrieval", str(tmp_path / "retr"), "--local-span", "128", "--out",
                                 str(tmp_path / "s"), "--time-limit", "20"])
    assert r.exit_code == 0, r.output
    plan = load_plan(tmp_path / "s" / "plan.json")
    ident = prof.meta.model
    # auto: the largest k whose plain shape (k dense, the rest sink 32 + 128) fits the budget, counted by hand
    k = max(j for j in range(9) if _density_by_counting(keep_dense_plan(ident, ranked[:j], 128, 32), 1024) <= 0.5)
    assert k >= 1
    assert all(plan.layers[layer].heads[h].kind == "dense" for layer, h in ranked[:k])
    assert plan.density(1024) <= 0.5 + 1e-9
    bad = CliRunner().invoke(app, ["search", "--profile", str(tmp_path / "profile"), "--budget", "0.5",
                                   "--retrieval", str(tmp_path / "retr"), "--keep-dense", "9", "--out",
                                   str(tmp_path / "s2")])
    assert bad.exit_code == 2 and "--keep-dense 9" in bad.output
    assert not (tmp_path / "s2" / "plan.json").exists()
    save_retrieval(RetrievalScores(scores[:3], torch.stack([scores[:3]] * 2), {}), tmp_path / "short")
    bad = CliRunner().invoke(app, ["search", "--profile", str(tmp_path / "profile"), "--budget", "0.5",
                                   "--retrieval", str(tmp_path / "short"), "--out", str(tmp_path / "s3")])
    assert bad.exit_code == 2 and "KV heads" in bad.output


def test_cli_profile_retrieval_on_a_saved_model(tiny_model_dir, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from compressor.cli import app

    monkeypatch.setenv("COMPRESS_HOME", str(tmp_path / "home"))
    r = CliRunner().invoke(app, ["profile", "--method", "retrieval", "--model", str(tiny_model_dir), "--lengths", "320",
                                 "--samples", "2", "--out", str(tmp_path / "retr")])
    assert r.exit_code == 0, r.output
    back = load_retrieval(tmp_path / "retr")
    assert back.scores.shape == (2, 2) and back.meta["task"].startswith("niah_single")
    assert back.meta["corpus"] == "austen"


def test_multikey_retrieval_items_score_the_queried_needle_among_distractors():
    """--retrieval-task niah_multikey: the anchor is the needle whose key the question names and whose value is the
    answer; the other needles are distractors with other keys and values; the tokens of the anchor's span decode to
    its text (checked against the tokenizer, not the item builder)."""
    _, tok = tiny_model_with_tokenizer("llama")
    items = retrieval_items(tok, [320], 3, seed=0, corpus=None, task="niah_multikey")
    assert len(items) == 3 and all(it.task == "niah_multikey" for it in items)
    for it in items:
        a = it.anchor
        assert a.key in it.question and it.answers == [a.value]
        others = [nd for nd in it.needles if nd is not a]
        assert others and all(nd.role == "distractor" and nd.key != a.key and nd.value != a.value for nd in others)
        assert a.value in tok.decode(it.prompt_ids[a.span[0]:a.span[1]])
    singles = retrieval_items(tok, [320], 3, seed=0, corpus=None)
    assert singles == retrieval_items(tok, [320], 3, seed=0, corpus=None, task="niah_single")
    assert not {tuple(i.prompt_ids) for i in items} & {tuple(i.prompt_ids) for i in singles}
    with pytest.raises(CompressError, match="one queried needle"):
        retrieval_items(tok, [320], 2, corpus=None, task="variable_tracking")


def test_cli_retrieval_task_is_checked_before_any_work(tmp_path):
    from typer.testing import CliRunner

    from compressor.cli import app

    r = CliRunner().invoke(app, ["profile", "--method", "taylor", "--retrieval-task", "niah_multikey",
                                 "--out", str(tmp_path / "p")])
    assert r.exit_code == 2 and "--retrieval-task and --query-rows are for --method retrieval" in r.output
    r = CliRunner().invoke(app, ["profile", "--method", "retrieval", "--retrieval-task", "niah_multivalue",
                                 "--out", str(tmp_path / "p")])
    assert r.exit_code == 2 and "must be one of niah_single, niah_multikey" in r.output
    r = CliRunner().invoke(app, ["profile", "--method", "retrieval", "--query-rows", "last",
                                 "--out", str(tmp_path / "p")])
    assert r.exit_code == 2 and "--query-rows must be a positive integer or 'question'" in r.output
    assert not list(tmp_path.iterdir())


def test_question_rows_mass_matches_eager_attention_weights():
    """query_rows=None (`--query-rows question`): the mean over every row after the context (question + answer
    prefix) of the eager attention weights on the needle, read from HF's output_attentions."""
    model, tok = tiny_model_with_tokenizer("llama", seed=5)
    item = retrieval_items(tok, [320], 2, seed=2, corpus=None, task="niah_multikey")[1]
    got = item_needle_mass(model, item, query_rows=None)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        out = model(input_ids=torch.tensor([item.prompt_ids]), output_attentions=True)
    s, e = item.anchor.span
    q0 = item.context_span[1]
    assert len(item.prompt_ids) - q0 > 5  # more rows than a small last-rows window
    want = torch.stack([a[0, :, q0:, s:e].sum(-1).mean(-1).double() for a in out.attentions])
    assert torch.allclose(got, want, atol=1e-5)
    r = run_retrieval_profile(model, tok, RetrievalArgs(lengths=[320], samples=2, corpus=None, query_rows=None), show_progress=False)
    assert r.meta["query_rows"] == "question"
    with pytest.raises(CompressError, match="query_rows"):
        run_retrieval_profile(model, tok, RetrievalArgs(lengths=[320], samples=2, corpus=None, query_rows=0), show_progress=False)
