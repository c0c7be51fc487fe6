"""Running a model: llamaviz.load, generation with a KV cache (dynamic or static), streamers, pipelines.

May import: llamaviz.llama, distributed, checkpoints, tokenizers. generation fills the model's
`generate` slot (llamaviz/llama/pretrained.py), so the model core never imports it.
"""
