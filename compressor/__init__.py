"""attention-compressor: profile -> search -> plan -> apply -> eval/bench for HF causal LMs.

``import compressor`` registers the ``"compress"`` attention implementation, so a patched model folder
loads with stock ``AutoModelForCausalLM.from_pretrained(dir)``.
"""

from compressor.patching import apply, plan_of, unapply  # noqa: F401  (registers the attention function)
from compressor.hf.plan_cache import PlanCache  # noqa: F401
from plans.errors import CompressError  # noqa: F401
from plans.io import load_plan, save_plan  # noqa: F401
from plans.schema import Plan  # noqa: F401

__all__ = ["apply", "unapply", "plan_of", "PlanCache", "CompressError", "load_plan", "save_plan", "Plan"]
