"""Analyses that take a model and return numbers: head detectors and scores (detectors, causal_scores),
readouts (logit lens, log-probs, direct logit attribution), clean/corrupted pairs, activation and
attribution patching (patching/), input attribution, information flow, interventions, test_prompt.

May import: llamaviz.llama, distributed, checkpoints, tokenizers, run. Plots, notebook and app draw
what these return; nothing here draws.
"""
