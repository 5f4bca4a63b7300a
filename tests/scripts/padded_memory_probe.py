"""Peak extra RSS (MiB) of one N-token forward of a tiny patched model, batch of 2: no padding, left or right padding
(a quarter of row 1). Run by tests/test_runtime_semantics.py in a fresh process so ru_maxrss is this forward's."""
import resource, sys, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
from tests.conftest import tiny_model
import compressor
from plans.identity import identity_from_config
from plans.schema import LayerPlan, Plan, SinkWindowPattern
torch.set_num_threads(2)
side, n = sys.argv[1], int(sys.argv[2])
m = tiny_model("llama", max_position_embeddings=n)
ident = identity_from_config(m.config)
compressor.apply(m, Plan(model=ident, layers=[LayerPlan(heads=[SinkWindowPattern(sink=4, alpha=256)] * 2)] * 2))
ids = torch.randint(4, 90, (2, n))
am = torch.ones(2, n, dtype=torch.long)
if side == "left": am[1, : n // 4] = 0
if side == "right": am[1, -n // 4 :] = 0
with torch.no_grad():
    m(ids[:, :64], attention_mask=am[:, :64], use_cache=False)  # warm up
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    m(ids, attention_mask=am, use_cache=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((peak - before) / 1024, before / 1024)
