"""The data the tool generates and reads: corpora and their held-out split (``corpora``), synthetic long-context
tasks (``synthetic``: passkey, line retrieval, QA prompts), RULER evaluation items (``ruler``), calibration sets
(``calibration``: recipes, cached samples) and the sample type every stage reads (``samples``)."""
