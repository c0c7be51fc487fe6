"""`llamaviz app` under torchrun: rank 0 serves the page, the other ranks follow its forwards.

Every rank loads the model sharded (tp_plan="auto"); rank 0's registry serves only that model (loading
another would need every rank), and each forward it runs is mirrored by the followers
(llamaviz.distributed.requests).
"""

from __future__ import annotations

import torch.distributed as dist

from llamaviz.app.models import REGISTRY, key_of


def launch_parallel(model_path: str, host: str, port: int, **launch_kwargs):
    """Load `model_path` on every rank; serve on rank 0, follow on the others; stop the followers on exit."""
    from llamaviz.run.loading import load
    from llamaviz.distributed.requests import follow, lead, stop_followers

    from llamaviz.app import launch

    model, tokenizer = load(model_path, tp_plan="auto")
    model.eval()
    model.name_or_path = str(model_path)
    if dist.get_rank() != 0:
        follow(model)
        return None
    REGISTRY.loader = _only(model_path, model, tokenizer)
    lead(model)
    try:
        return launch(model_path, host, port, **launch_kwargs)
    finally:
        stop_followers()


def _only(model_path: str, model, tokenizer):
    """A registry loader that hands out the sharded model and refuses any other checkpoint."""
    def loader(path, progress=None):
        if key_of(path) != key_of(model_path):
            raise ValueError(f"under tensor parallelism the app serves only the model it was started with "
                             f"({model_path}); restart `torchrun ... -m llamaviz app --model {path}` to use {path}")
        return model, tokenizer
    return loader
