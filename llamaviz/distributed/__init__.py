"""Running one model on several devices: tensor parallelism (tp_plan), layer placement (device_map),
and parallel requests (every rank follows the prompts rank 0 reads).

May import: llamaviz.llama. checkpoints sits above (it reads each rank's shard for a plan).
"""
