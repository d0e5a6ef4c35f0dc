"""Plan builders for runtime tests."""

from __future__ import annotations

import torch

from runtime.plan import Plan, fingerprint_from_model


def pyramid_plan(model, keep, window: int = 8, sink: int = 2, **extra) -> Plan:
    layers = model.config.num_hidden_layers
    keep = torch.as_tensor(keep, dtype=torch.float32).expand(layers).clone()
    return Plan(
        fingerprint=fingerprint_from_model(model),
        methods=("pyramidinfer",),
        params={"pyramidinfer": {"window": window, "sink": sink, **extra}},
        tensors={"pyramidinfer.layer_keep": keep},
        target_ratio=float(keep.mean()),
    )


def greedy(model, ids, new_tokens=16, **kwargs):
    return model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **kwargs)
