"""The default shape of a compressed head, in one place: sink tokens, the local span a non-retrieval head keeps,
and the token block that profiles bucket distances by and spans are rounded to.

StreamingLLM keeps 4 sinks; MoA (arXiv 2406.14909) profiles with 64-token blocks. 64 sinks + a 256-token span is
the shape this project measured best for the heads a budget cannot keep dense
(benchmarks/results/fidelity_method.md).
"""

DEFAULT_SINK = 64  # tokens at the start of the sequence every sparse head keeps
DEFAULT_LOCAL_SPAN = 256  # span (tokens, sink included) of the heads not kept dense
DEFAULT_BLOCK = 64  # profile distance bucket and span granularity, tokens

__all__ = ["DEFAULT_SINK", "DEFAULT_LOCAL_SPAN", "DEFAULT_BLOCK"]
