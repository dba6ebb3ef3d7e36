"""Forward-only work on a trained model: scoring pairs (``evaluate``), decoding (``generate``), prompt
sets (``prompts``), text metrics (``text_metrics``) and the comparison report (``report``)."""
