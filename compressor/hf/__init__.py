"""The one seam to transformers: everything that knows HF modules, masks and caches.

* :mod:`compressor.hf.modules` — finding attention modules, their typed per-module state, model checks, cache hooks;
* :mod:`compressor.hf.layout` — HF mask arguments -> real positions of queries and keys (:class:`KeyLayout`);
* :mod:`compressor.hf.plan_attention` — the plan's attention function (``"compress"``);
* :mod:`compressor.hf.plan_cache` — :class:`PlanCache`, per-head bounded KV as a ``transformers.Cache``;
* :mod:`compressor.hf.sequence` — a sequence's prompt length N0, on its cache or in uncached generation's kwargs;
* :mod:`compressor.hf.stock_paths` — what ``from_pretrained`` / ``save_pretrained`` / ``generate`` need to know of a plan;
* :mod:`compressor.hf.influence_attention`, :mod:`compressor.hf.gate_attention`,
  :mod:`compressor.hf.retrieval_attention` — the attention functions used while profiling influence, learning gates
  and scoring retrieval heads.

Importing this package registers every attention implementation with ``AttentionInterface`` and
``AttentionMaskInterface`` (each module registers its own at import, one style).
"""

from compressor.hf import gate_attention, plan_attention, influence_attention, retrieval_attention  # noqa: F401  (register themselves)
from compressor.hf import stock_paths  # noqa: F401  (wraps post_init / generate for models that run a plan)
from compressor.hf.plan_cache import PlanCache, dense_cache_bytes  # noqa: F401
