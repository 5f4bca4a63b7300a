"""Issue 13's levers measured on the default model: ranking stability (lever 1), the first-order estimate against
the real loss change (lever 4), and an Optuna study that picks the local spans by held-in retrieval accuracy
(lever 6). The plans these produce are judged by ``benchmarks/fidelity.py`` on the held-out suite.

    python benchmarks/fidelity_levers.py rankings      # halves' agreement, overlap with the retrieval ranking
    python benchmarks/fidelity_levers.py second-order  # lever 4: estimate vs measured loss change
    python benchmarks/fidelity_levers.py optuna --budget 0.25 --trials 14
    python benchmarks/fidelity_levers.py reachable --shapes dense k16:s256:sink64 k20:s128:sink64  # held-in oracle

Inputs (written by the commands in ``benchmarks/results/fidelity_method.md``): MoA-style influence profiles on
model-answered long-context questions (``compress profile --sources qa``, two disjoint seeds per length) under
``runs/lev/``, the retrieval scores ``benchmarks/results/plans/smollm2_retrieval_scores.*`` and, when present, a
gates profile ``runs/lev/gates``. Each step adds its section to ``benchmarks/results/fidelity_levers.json`` (with the
command, machine and date); plans go to ``benchmarks/results/plans/``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from common import machine
from plans.atomic import write_text_atomic

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PLANS = RESULTS / "plans"
RETRIEVAL = PLANS / "smollm2_retrieval_scores"
LEV = ROOT / "runs" / "lev"
SINK, SPAN = 64, 256  # the local shape of the default plans (compress run --local-span)


def _kept_dense(plan) -> int:
    """How many KV heads ``plan`` keeps dense."""
    return sum(h.kind == "dense" for layer in plan.layers for h in layer.heads)


def _save(section: str, payload: dict, argv) -> None:
    path = RESULTS / "fidelity_levers.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    payload = {"command": "python benchmarks/fidelity_levers.py " + " ".join(argv), "machine": machine(),
               "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), **payload}
    data[section] = payload
    write_text_atomic(path, json.dumps(data, indent=1) + "\n")
    print(json.dumps(payload, indent=1)[:4000], flush=True)


@dataclass(frozen=True)
class HeldIn:
    """Held-in items of one task (grid seed 1; the held-out suite is seed 0): ``items`` at ``n_tokens``, noise
    haystack, plain prompts."""

    task: str
    n_tokens: int
    items: int

    def samples(self, tok) -> list:
        from compressor.fidelity import FidelityGrid, make_cell_items
        from profilers.data import ruler

        grid = FidelityGrid(tasks=(self.task,), lengths=(self.n_tokens,), n_per_cell=self.items, seed=1,
                            style="plain", haystack="noise")
        return [ruler.to_sample(it, tok)
                for it in make_cell_items(self.task, tok, self.n_tokens, grid, "plain", ruler.NOISE)]


def _influence(stems: list[str]):
    from profilers.profile_format import load_profile, merge_profiles

    return merge_profiles([load_profile(LEV / s) for s in stems])


def _head_loss(profile, n: int, by_layer: bool) -> torch.Tensor:
    """[L, Hkv] first-order loss of restricting each KV head to sink 64 + span 256 at length n (optionally each
    layer's influence normalised to sum 1, as the search does)."""
    from profilers.profile_format import normalize_profile

    p = normalize_profile(profile, "layer" if by_layer else "none")
    return p.masked_loss(n, SINK, SPAN)


# ---------------------------------------------------------------------------------------------------------------
# rankings (lever 1: stability of the MoA-style profile; lever 2 vs 1 vs 3: do the signals pick the same heads)


def rankings(argv) -> None:
    from profilers.retrieval import load_retrieval, ranking_agreement

    ret = load_retrieval(RETRIEVAL)
    out = {"k": 31, "retrieval_halves": ranking_agreement(ret.halves[0], ret.halves[1], 31), "influence": {}}
    for n, halves in ((2048, ("qa_s0", "qa_s1")), (4096, ("qa4k_s0", "qa4k_s1"))):
        if not all((LEV / f"{h}.json").exists() for h in halves):
            continue
        a, b = (_influence([h]) for h in halves)
        both = _influence(list(halves))
        row = {"samples": both.meta.samples[n]}
        for by_layer in (False, True):
            tag = "layer_normalised" if by_layer else "raw"
            row[tag] = {"halves": ranking_agreement(_head_loss(a, n, by_layer), _head_loss(b, n, by_layer), 31),
                        "vs_retrieval": ranking_agreement(_head_loss(both, n, by_layer), ret.scores, 31)}
        out["influence"][str(n)] = row
    gates = LEV / "gates.json"
    if gates.exists():
        meta = json.loads(gates.read_text())
        g = torch.tensor(meta["extra"]["gates_kv"], dtype=torch.float64)
        out["gates"] = {"vs_retrieval": ranking_agreement(g, ret.scores, 31), "steps": meta["extra"]["steps"],
                        "mean_gate": float(g.mean()), "gates_kv": meta["extra"]["gates_kv"]}
    _save("rankings", out, argv)


# ---------------------------------------------------------------------------------------------------------------
# lever 4: the first-order estimate against the measured loss change


def _answer_loss(model, samples) -> float:
    from compressor.influence_profile import sample_loss

    with torch.no_grad():
        return float(sum(float(sample_loss(model, s)) for s in samples) / len(samples))


def second_order(argv, heads_per_group: int) -> None:
    from compressor.args import CalibrationArgs
    from compressor.models import compress_home, load_model
    from compressor.patching import plan_applied
    from plans.identity import identity_from_config
    from profilers.data.calibration import get_or_build_calibration
    from profilers.retrieval import load_retrieval
    from search_space.keep_dense import keep_dense_plan
    from scipy.stats import spearmanr

    torch.set_num_threads(1)
    n = 2048
    model, tok = load_model(None)  # float32, as the profile
    samples = get_or_build_calibration(compress_home() / "calibration", tok,
                                       CalibrationArgs((n,), 4, ("qa",), 0).recipe("default"), model=model)[n]
    prof = _influence(["qa_s0"])  # the same 4 samples: estimate and measurement see identical data
    est = _head_loss(prof, n, by_layer=False)
    ident = identity_from_config(model.config)
    L, H = est.shape
    order = sorted(((float(est[li, h]), li, h) for li in range(L) for h in range(H)), reverse=True)
    picks = order[:heads_per_group] + order[len(order) // 2 - heads_per_group // 2:][:heads_per_group] \
        + order[-heads_per_group:]
    all_heads = [(li, h) for li in range(L) for h in range(H)]
    t0 = time.time()
    base = _answer_loss(model, samples)
    rows = []
    for e, li, h in picks:
        with plan_applied(model, keep_dense_plan(ident, [x for x in all_heads if x != (li, h)], SPAN, SINK)):
            rows.append({"layer": li, "kv_head": h, "estimate": e, "measured": _answer_loss(model, samples) - base})
        print(rows[-1], flush=True)
    ranked = load_retrieval(RETRIEVAL).top(L * H)
    whole = []
    for name, kept in (("all local", []), ("top-31 retrieval dense", ranked[:31]), ("top-1 retrieval dense", ranked[:1])):
        plan = keep_dense_plan(ident, kept, SPAN, SINK)
        ks = set(kept)
        e = float(sum(est[li, h] for li, h in all_heads if (li, h) not in ks))
        with plan_applied(model, plan):
            whole.append({"plan": name, "density": plan.density(n), "estimate_sum": e,
                          "measured": _answer_loss(model, samples) - base})
        print(whole[-1], flush=True)
    rho = spearmanr([r["estimate"] for r in rows], [r["measured"] for r in rows]).statistic
    _save("second_order", {"n_tokens": n, "samples": len(samples), "dense_answer_ce": base, "single_heads": rows,
                           "spearman_single_heads": float(rho), "whole_plans": whole,
                           "seconds": round(time.time() - t0, 1)}, argv)


# ---------------------------------------------------------------------------------------------------------------
# lever 6: Optuna picks the local spans by held-in retrieval accuracy


def optuna_spans(argv, budget: str, trials: int, items: int, n_val: int, groups: int, seed: int) -> None:
    import optuna

    from compressor.evaluation import answer_score
    from compressor.models import load_model
    from compressor.patching import plan_applied
    from plans.identity import identity_from_config
    from plans.io import save_plan
    from profilers.retrieval import load_retrieval
    from search_space.budgets import parse_budgets
    from search_space.keep_dense import fit_keep_dense_plan

    torch.set_num_threads(1)
    model, tok = load_model(None, dtype="bfloat16")
    ident = identity_from_config(model.config)
    L = ident.num_layers
    ranked = load_retrieval(RETRIEVAL).top(L * ident.num_kv_heads)
    budgets, lengths = parse_budgets([budget]), [2048, 4096]  # compress run's budgets: at its eval lengths
    # held-in items: grid seed 1 (the held-out suite is seed 0), one length beyond the profiled 1024
    val = HeldIn("niah_single", n_val, items).samples(tok)
    choices = (96, 128, 160, 192, 256, 320, 384)
    sinks = (4, 16, 64)
    bounds = [round(g * L / groups) for g in range(groups + 1)]
    cache: dict[tuple, dict] = {}
    history = []

    def spans_of(t: tuple) -> list[int]:
        return [t[g] for g in range(groups) for _ in range(bounds[g], bounds[g + 1])]

    def evaluate(t: tuple) -> dict:
        """t = (sink, span of layer group 0, 1, ...)."""
        if t in cache:
            return cache[t]
        try:
            plan = fit_keep_dense_plan(ident, ranked, budgets, lengths, spans_of(t[1:]), t[0])
        except Exception as e:  # no plan at all under the budget with these spans
            cache[t] = {"sink": t[0], "spans": list(t[1:]), "feasible": False, "why": str(e)[:120]}
            return cache[t]
        with plan_applied(model, plan):
            scores = [answer_score(model, s) for s in val]
        correct = sum(ok for ok, _ce, _n in scores)
        ce = sum(c / max(1, m) for _ok, c, m in scores) / len(scores)
        k = _kept_dense(plan)
        cache[t] = {"sink": t[0], "spans": list(t[1:]), "feasible": True, "kept_dense": k, "correct": int(correct), "n": len(val),
                    "answer_ce": ce,
                    "density_2048": plan.density(2048), "kv_density_2048": plan.kv_density(2048), "plan": plan}
        return cache[t]

    def objective(trial) -> float:
        t = (trial.suggest_categorical("sink", sinks),
             *(trial.suggest_categorical(f"span_{g}", choices) for g in range(groups)))
        r = evaluate(t)
        history.append({k: v for k, v in r.items() if k != "plan"})
        print(history[-1], flush=True)
        # held-in accuracy; the answer CE (nats per answer token) breaks ties within 0.01
        return -1.0 if not r["feasible"] else r["correct"] / r["n"] - 0.01 * min(r["answer_ce"], 50.0) / 50.0

    t0 = time.time()
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    study.enqueue_trial({"sink": SINK, **{f"span_{g}": SPAN for g in range(groups)}})  # the default shape
    study.enqueue_trial({"sink": 16, **{f"span_{g}": 192 for g in range(groups)}})  # StreamingLLM-like sink
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study.optimize(objective, n_trials=trials)
    feasible = [r for r in cache.values() if r["feasible"]]
    # best held-in accuracy; ties: the lower answer CE
    best = max(feasible, key=lambda r: (r["correct"], -r["answer_ce"]))
    tag = budget.replace("@", "_").replace("=", "_")
    path = PLANS / f"optuna_spans_{tag}.json"
    save_plan(best["plan"], path)
    _save(f"optuna_{tag}", {"budget": budget, "lengths": lengths, "validation": {"task": "niah_single",
          "n_tokens": n_val, "items": items, "grid_seed": 1}, "groups": bounds, "choices": list(choices), "sinks": list(sinks),
          "trials": history, "best": {k: v for k, v in best.items() if k != "plan"}, "plan": str(path.relative_to(ROOT)),
          "seconds": round(time.time() - t0, 1)}, argv)


# ---------------------------------------------------------------------------------------------------------------
# the default shape (top-k dense, the rest sink 64 + span 256) ranked by another signal


@dataclass(frozen=True)
class Ranking:
    """The ranking a ranked plan keeps dense: ``signal`` ``qa`` (MoA-style influence of the ``qa_profiles`` stems
    in ``runs/lev``, layer-normalised, at their longest length), ``gates`` (DuoAttention-style gate values) or
    ``retrieval`` (the scores at ``retrieval``: compress run's own shape, here for another model); ``compare``:
    retrieval scores of the same model to report the kept heads' overlap with."""

    signal: str
    retrieval: Path = RETRIEVAL
    qa_profiles: tuple[str, ...] = ("qa_s0", "qa_s1")
    compare: Path = RETRIEVAL


def _ranking_scores(ranking: Ranking) -> tuple[torch.Tensor, object, dict]:
    """(scores [L, Hkv], the model identity, what the results record about the source) of ``ranking``."""
    from profilers.retrieval import load_retrieval

    if ranking.signal == "retrieval":
        from plans.identity import ModelIdentity

        r = load_retrieval(ranking.retrieval)
        return r.scores, ModelIdentity.model_validate(r.meta["model"]), {"retrieval": str(ranking.retrieval)}
    if ranking.signal == "qa":
        stems = list(ranking.qa_profiles)
        prof = _influence(stems)
        n = max(prof.meta.lengths)
        return _head_loss(prof, n, by_layer=True), prof.meta.model, {"profiles": stems, "n_tokens": n}
    if ranking.signal == "gates":
        meta = json.loads((LEV / "gates.json").read_text())
        scores = torch.tensor(meta["extra"]["gates_kv"], dtype=torch.float64)
        from profilers.profile_format import load_profile

        return scores, load_profile(LEV / "gates").meta.model, {"profile": "runs/lev/gates"}
    raise SystemExit(f"unknown signal {ranking.signal!r}")


def ranked_plan(argv, ranking: Ranking, budget: str, name: str | None = None, span: int = SPAN,
                sink: int = SINK) -> None:
    """Write ``plans/{name or signal + '_top'}_{budget}.json``: the heads ``ranking`` ranks highest kept dense, as
    many as the budget affords at compress run's eval lengths, the rest ``sink`` + ``span`` (default 64 + 256: the
    shape of ``run_0.5.json``, whose ranking is the retrieval score). The kept heads' overlap with the top k of
    ``ranking.compare`` is recorded unless ``compare`` is the ranking itself."""
    from plans.io import save_plan
    from profilers.retrieval import load_retrieval, top_heads
    from search_space.budgets import parse_budgets
    from search_space.keep_dense import fit_keep_dense_plan

    signal = ranking.signal
    scores, ident, info = _ranking_scores(ranking)
    ranked = top_heads(scores, scores.numel())
    plan = fit_keep_dense_plan(ident, ranked, parse_budgets([budget]), [2048, 4096], span, sink)
    k = _kept_dense(plan)
    path = PLANS / f"{name or signal + '_top'}_{budget}.json"
    save_plan(plan, path)
    if signal != "retrieval" or Path(ranking.compare) != Path(ranking.retrieval):
        info |= {"compare": str(ranking.compare),
                 "overlap_with_compare_top_k": len(set(load_retrieval(ranking.compare).top(k)) & set(ranked[:k]))}
    _save(f"ranked_plan_{name or signal}_{budget}", {"signal": signal, "budget": budget, "kept_dense": k,
          "sink": sink, "span": span,
          "plan": str(path.relative_to(ROOT)), **info}, argv)


# ---------------------------------------------------------------------------------------------------------------
# the lever table: every lever plan against its equal-cost uniform windows, the default plan and dense


def _outcomes(path: Path) -> tuple[dict, dict]:
    """({(task, N, method): [0/1, ...]}, {(N, method): (density, kv_density)}) from a fidelity results file."""
    d = json.loads(path.read_text())
    out = {(it["task"], it["n_tokens"], m): o for it in d["items"] for m, o in it["outcomes"].items()}
    cost = {(c["n_tokens"], c["method"]): (c["density"], c["kv_density"]) for c in d["cells"]}
    return out, cost


def table(argv, evals: list[str], reference: str, reference_file: str = "fidelity") -> None:
    """Markdown rows (printed and saved): per plan in the ``evals`` result files (their items pooled: a plan judged
    in several files, e.g. one task each, gets one row) and per cell, correct/n with the Wilson interval, and the
    pooled paired McNemar diff / p vs the uniform window at equal prefill and KV density, vs ``reference`` (a plan
    in ``reference_file``, judged on the same items) and vs dense."""
    from compressor.statistics import mcnemar_pooled, wilson_interval

    ref, _ = _outcomes(RESULTS / f"{reference_file}.json")
    out, cost, files = {}, {}, {}
    for stem in evals:
        o, c = _outcomes(RESULTS / f"{stem}.json")
        out |= o
        cost |= c
        for _t, _n, m in o:
            files.setdefault(m, set()).add(stem)
    rows = []
    for plan in sorted({m for (_t, _n, m) in out if m != "dense" and not m.startswith("uniform[")}):
        keys = sorted({(t, n) for (t, n, m) in out if m == plan})
        cells = []
        for t, n in keys:
            o = out[(t, n, plan)]
            lo, hi = wilson_interval(sum(o), len(o))
            cells.append({"task": t, "n_tokens": n, "density": cost[(n, plan)][0], "kv_density": cost[(n, plan)][1],
                          "correct": sum(o), "n": len(o), "ci95": [lo, hi]})
        comps = {}
        for name, base in (("uniform_prefill", f"uniform[{plan}|prefill_density]"),
                           ("uniform_kv", f"uniform[{plan}|kv_density]"), ("dense", "dense")):
            r = mcnemar_pooled([(out[(t, n, plan)], out[(t, n, base)]) for t, n in keys])
            comps[name] = {"diff": r.diff, "p": r.p_value}
        if all((t, n, reference) in ref for t, n in keys):
            r = mcnemar_pooled([(out[(t, n, plan)], ref[(t, n, reference)]) for t, n in keys])
            comps[reference] = {"diff": r.diff, "p": r.p_value}
        dense_same = all(out[(t, n, "dense")] == ref.get((t, n, "dense")) for t, n in keys)
        rows.append({"plan": plan, "files": sorted(files[plan]), "cells": cells, "vs": comps,
                     f"dense_reproduces_{reference_file}_json": dense_same})
    _save(f"table_{'_'.join(evals)}", {"reference": reference, "reference_file": reference_file, "rows": rows}, argv)


# ---------------------------------------------------------------------------------------------------------------
# perplexity of every lever plan, as compress run's report measures it


def perplexity(argv, plan_names: list[str], lengths: list[int], samples: int, model_name: str | None = None,
               label: str = "") -> None:
    """Held-out Austen perplexity (fp32; ``samples`` windows per length, pooled over windows and lengths) of dense
    and each plan in ``plans/``: :func:`compressor.evaluation.evaluate` with the ``ppl`` task, as `compress run`.
    ``model_name``: a short name (None: the default model; another model's section is ``perplexity_{name}``);
    ``label``: added to the section's name (each set of plans its own section)."""
    import math

    from compressor.args import EvalArgs
    from compressor.evaluation import evaluate
    from compressor.models import load_model
    from plans.io import load_plan

    torch.set_num_threads(1)
    model, tok = load_model(model_name)
    plans = {name: load_plan(PLANS / f"{name}.json") for name in plan_names}
    rep = evaluate(model, tok, plans, EvalArgs("ppl", tuple(lengths), samples=samples, corpus="austen",
                                               include_uniform=False))
    out = {}
    for m in rep.methods:
        cells = [c for c in rep.cells if c.method == m]
        loss, toks = sum(c.loss_sum for c in cells), sum(c.tokens for c in cells)
        out[m] = {"ppl": math.exp(loss / toks), "tokens": toks,
                  "by_length": {str(c.n): math.exp(c.loss_sum / c.tokens) for c in cells}}
    dense = out["dense"]["ppl"]
    for m in out:
        out[m]["vs_dense"] = out[m]["ppl"] / dense - 1
    section = "perplexity" + (f"_{label}" if label else "") + (f"_{model_name}" if model_name else "")
    _save(section, {"model": model_name or "default", "lengths": lengths, "windows_per_length": samples,
                    "corpus": "austen (held-out split)", "dtype": "float32", "methods": out}, argv)


# ---------------------------------------------------------------------------------------------------------------
# how retrieval rankings differ: agreement between score files, and where given heads / layers rank


def score_ranks(argv, stems: list[str], k: int, heads: list[str], layers: str | None) -> None:
    """For retrieval score files ``stems`` (in ``plans/``): Spearman and top-``k`` overlap of every pair, the rank
    (1 = highest) of each ``heads`` entry (``layer:kv_head``) in each, and how many heads of ``layers`` (``a-b``)
    each puts in its top ``k``."""
    from profilers.retrieval import load_retrieval, ranking_agreement

    scores = {stem: load_retrieval(PLANS / stem) for stem in stems}
    pairs = {f"{a} vs {b}": ranking_agreement(scores[a].scores, scores[b].scores, k)
             for i, a in enumerate(stems) for b in stems[i + 1:]}
    wanted = [tuple(int(x) for x in h.split(":")) for h in heads]
    ranks, in_layers = {}, {}
    for stem, r in scores.items():
        order = r.top(r.scores.numel())
        ranks[stem] = {f"{li}:{h}": order.index((li, h)) + 1 for li, h in wanted}
        if layers:
            lo, hi = (int(x) for x in layers.split("-"))
            in_layers[stem] = sum(lo <= li <= hi for li, _h in order[:k])
    _save(f"score_ranks_{'_'.join(stems)}", {"k": k, "pairs": pairs, "ranks": ranks, "layers": layers,
                                              "top_k_in_layers": in_layers}, argv)


# ---------------------------------------------------------------------------------------------------------------
# what is reachable: plan shapes around a budget judged on held-in items of one task (the oracle search)


def parse_shape(spec: str) -> dict:
    """``dense`` or ``k16:s256:sink64[:L0-7]``: the top ``k`` retrieval KV heads dense, every other head ``sink`` +
    span ``s``, and (optionally) every head of layers ``a``..``b`` (inclusive) dense as well."""
    if spec == "dense":
        return {"spec": spec, "dense": True}
    import re

    out = {"spec": spec, "dense": False, "layers": None}
    for part in spec.split(":"):
        if m := re.fullmatch(r"(k|s|sink)(\d+)", part):
            out[{"k": "k", "s": "span", "sink": "sink"}[m[1]]] = int(m[2])
        elif m := re.fullmatch(r"L(\d+)-(\d+)", part):
            out["layers"] = (int(m[1]), int(m[2]))
        else:
            raise SystemExit(f"bad shape {spec!r}: parts are kN, sN, sinkN, La-b")
    if not {"k", "span", "sink"} <= out.keys():
        raise SystemExit(f"bad shape {spec!r}: needs kN:sN:sinkN")
    return out


def shape_plan(ident, ranked: list[tuple[int, int]], shape: dict):
    """The plan of a :func:`parse_shape` dict (None for dense)."""
    from search_space.keep_dense import keep_dense_plan

    if shape["dense"]:
        return None
    kept = list(ranked[:shape["k"]])
    if shape["layers"]:
        a, b = shape["layers"]
        kept += [(li, h) for li in range(a, b + 1) for h in range(ident.num_kv_heads) if (li, h) not in kept]
    return keep_dense_plan(ident, kept, shape["span"], shape["sink"])


def reachable(argv, model_name: str, retrieval: Path, held_in: HeldIn, shapes: list[str], part: str,
              label: str = "") -> None:
    """Held-in accuracy (``held_in``: grid seed 1; the held-out suite is seed 0) of each shape in ``shapes``: the
    search for what is reachable at a cost, never touching the held-out items. ``part`` = ``i/m`` runs every m-th
    shape (two 1-thread processes share the machine)."""
    from compressor.evaluation import answer_score
    from compressor.models import load_model
    from compressor.patching import plan_applied
    from plans.identity import identity_from_config
    from profilers.retrieval import load_retrieval

    task, n_tokens = held_in.task, held_in.n_tokens
    i, m = (int(x) for x in part.split("/"))
    mine = [parse_shape(s) for s in shapes][i::m]
    torch.set_num_threads(1)
    model, tok = load_model(model_name, dtype="bfloat16")
    ident = identity_from_config(model.config)
    ranked = load_retrieval(retrieval).top(ident.num_layers * ident.num_kv_heads)
    val = held_in.samples(tok)
    rows, t0 = [], time.time()
    for shape in mine:
        plan = shape_plan(ident, ranked, shape)
        with plan_applied(model, plan):
            scores = [answer_score(model, s) for s in val]
        cost = ({"kept_dense": ident.num_layers * ident.num_kv_heads, "density": 1.0, "density_4096": 1.0,
                 "kv_density": 1.0} if plan is None else
                {"kept_dense": _kept_dense(plan), "density": plan.density(n_tokens), "density_4096": plan.density(4096),
                 "kv_density": plan.kv_density(n_tokens)})
        rows.append({"shape": shape["spec"], **cost, "correct": int(sum(ok for ok, _c, _n in scores)), "n": len(val),
                     "outcomes": [int(ok) for ok, _c, _n in scores],
                     "answer_ce": sum(c / max(1, k) for _ok, c, k in scores) / len(scores)})
        print({k: v for k, v in rows[-1].items() if k != "outcomes"}, flush=True)
    section = f"reachable_{model_name}_{task}" + (f"_{label}" if label else "") + f"_{i}of{m}"
    _save(section, {"model": model_name, "retrieval": str(retrieval), "task": task, "n_tokens": n_tokens,
                    "items": held_in.items, "grid_seed": 1, "rows": rows, "seconds": round(time.time() - t0, 1)}, argv)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="step", required=True)
    sub.add_parser("rankings")
    so = sub.add_parser("second-order")
    so.add_argument("--heads-per-group", type=int, default=4)
    rp = sub.add_parser("ranked-plan")
    rp.add_argument("--signal", choices=("qa", "gates", "retrieval"), required=True)
    rp.add_argument("--budget", default="0.5")
    rp.add_argument("--retrieval", default=str(RETRIEVAL))
    rp.add_argument("--name", default=None, help="plan file stem (default: SIGNAL_top)")
    rp.add_argument("--qa-profiles", default="qa_s0,qa_s1", help="with --signal qa: profile stems in runs/lev")
    rp.add_argument("--compare", default=str(RETRIEVAL), help="retrieval scores to report the kept heads' overlap with")
    rp.add_argument("--span", type=int, default=SPAN, help="local span of the heads not kept dense")
    rp.add_argument("--sink", type=int, default=SINK)
    tb = sub.add_parser("table")
    tb.add_argument("--evals", nargs="+", required=True, help="fidelity result stems in benchmarks/results")
    tb.add_argument("--reference", default="run_0.5", help="the plan in --reference-file to pair against")
    tb.add_argument("--reference-file", default="fidelity", help="results stem in benchmarks/results holding it")
    pp = sub.add_parser("perplexity")
    pp.add_argument("--plans", nargs="+", default=["run_0.5", "qa_top_0.5", "gates_top_0.5", "run_0.25",
                                                   "optuna_spans_0.25"])
    pp.add_argument("--lengths", default="2048,4096")
    pp.add_argument("--samples", type=int, default=1)
    pp.add_argument("--model", default=None, help="short model name (default: the default model)")
    pp.add_argument("--label", default="", help="added to the results section's name")
    sr = sub.add_parser("score-ranks")
    sr.add_argument("--scores", nargs="+", required=True, help="retrieval score stems in benchmarks/results/plans")
    sr.add_argument("--k", type=int, default=16)
    sr.add_argument("--heads", nargs="*", default=[], help="layer:kv_head entries whose ranks to report")
    sr.add_argument("--layers", default=None, help="a-b: count each ranking's top-k heads in these layers")
    rc = sub.add_parser("reachable")
    rc.add_argument("--model", default="qwen2.5-coder-0.5b")
    rc.add_argument("--retrieval", default=str(PLANS / "qwen_retrieval_scores"))
    rc.add_argument("--task", default="niah_multikey")
    rc.add_argument("--n-tokens", type=int, default=2048)
    rc.add_argument("--items", type=int, default=16)
    rc.add_argument("--shapes", nargs="+", required=True, help="dense | kN:sN:sinkN[:La-b] (see parse_shape)")
    rc.add_argument("--part", default="0/1", help="i/m: this process runs shapes i, i+m, ...")
    rc.add_argument("--label", default="", help="added to the results section's name (one per round of shapes)")
    op = sub.add_parser("optuna")
    op.add_argument("--budget", default="0.25")
    op.add_argument("--trials", type=int, default=14)
    op.add_argument("--items", type=int, default=10)
    op.add_argument("--n-val", type=int, default=2048)
    op.add_argument("--groups", type=int, default=3)
    op.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if a.step == "rankings":
        rankings(argv)
    elif a.step == "perplexity":
        perplexity(argv, a.plans, [int(x) for x in a.lengths.split(",")], a.samples, a.model, a.label)
    elif a.step == "score-ranks":
        score_ranks(argv, a.scores, a.k, a.heads, a.layers)
    elif a.step == "reachable":
        reachable(argv, a.model, Path(a.retrieval), HeldIn(a.task, a.n_tokens, a.items), a.shapes, a.part, a.label)
    elif a.step == "table":
        table(argv, a.evals, a.reference, a.reference_file)
    elif a.step == "ranked-plan":
        ranking = Ranking(a.signal, Path(a.retrieval), tuple(a.qa_profiles.split(",")), Path(a.compare))
        ranked_plan(argv, ranking, a.budget, a.name, a.span, a.sink)
    elif a.step == "second-order":
        second_order(argv, a.heads_per_group)
    else:
        optuna_spans(argv, a.budget, a.trials, a.items, a.n_val, a.groups, a.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
