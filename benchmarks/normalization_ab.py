"""A/B of per-layer influence normalisation in the search: raw vs normalised vs a 256-token minimum span vs both
vs the uniform plan, each at the same budget, scored by answer-token CE on 3 passkeys and text CE on one held-out
Austen window at N=2048 (default model).

    python benchmarks/normalization_ab.py PROFILE_STEM "density@2048=0.25"
"""
import sys

import torch

from profilers.profile_format import load_profile, normalize_profile
from search_space.search import SearchArgs, search
from search_space.candidates import candidate_grid
from plans.schema import uniform_plan, span_for_density
from compressor.models import load_model
from compressor.patching import apply, unapply
from compressor.evaluation import answer_score, make_samples
from profilers.data.corpora import load_corpus, split_corpus
torch.manual_seed(0)
prof = load_profile(sys.argv[1])
budget = sys.argv[2] if len(sys.argv) > 2 else "density@2048=0.25"
normalized = normalize_profile  # the search's own per-layer normalisation, applied explicitly here
grid = candidate_grid(prof.meta.lengths, block=64, sinks=[64])
minspan = [c for c in grid if c.kind == "dense" or min(c.span(n) for n in prof.meta.lengths) >= 256]
variants = {
  "A_raw": search(prof, [budget], SearchArgs(normalize="none")).plan,
  "B_norm": search(normalized(prof), [budget], SearchArgs(normalize="none")).plan,
  "C_min256": search(prof, [budget], SearchArgs(grid=minspan, normalize="none")).plan,
  "D_both": search(normalized(prof), [budget], SearchArgs(grid=minspan, normalize="none")).plan,
}
m, tok = load_model()
hay = list(split_corpus(load_corpus("austen")).heldout)
data = make_samples("passkey", tok, [2048], [0.2, 0.5, 0.8], 1, 7, hay)
samples = [s for v in data.values() for s in v]
data2 = make_samples("ppl", tok, [2048], [None], 1, 7, hay)
txt = data2[(2048, None)][0]
n = 2048
variants["U"] = uniform_plan(variants["A_raw"].model, span_for_density(variants["A_raw"].density(n), n), sink=64)
from compressor.evaluation import text_loss
for name, p in [("dense", None)] + list(variants.items()):
    if p is None: unapply(m)
    else: apply(m, p)
    ces = [answer_score(m, s) for s in samples]
    tl, tc = text_loss(m, txt.input_ids)
    print(name, "dens", None if p is None else round(p.density(n),3), "acc", sum(c[0] for c in ces), "ansCE", round(sum(c[1] for c in ces)/sum(c[2] for c in ces),3), "textCE", round(tl/tc,4), flush=True)
