"""Double backward of the fused stage: its math again, in differentiable PyTorch ops.

The stage's own backward (``stage_algorithm.backward``) is not differentiable. When autograd asks
for a graph of the gradients (``create_graph=True``: gradient penalties, Hessian-vector
products), the stage's backward instead recomputes the stage from its saved inputs with
torch.cat / batch_norm / relu / conv2d / avg_pool2d, reusing the forward's dropout masks, and
differentiates that: torchvision's numbers, at torchvision's memory cost, only on that path.

The stage's op saves its input for this as the first channels of its kept buffer (stage.py), at no
memory cost, except under saved-tensor hooks of the user's own, which then save it as they save
every tensor.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

_PARAMS_PER_LAYER = 6  # as stage_algorithm.PARAMS_PER_LAYER


def eval_running_stats(running: Sequence[Tensor], batch_stats: Sequence[bool]) -> list[Optional[tuple[Tensor, Tensor]]]:
    """Per norm, the running (mean, var) it normalizes with, or None where it uses batch statistics;
    ``running`` holds the (mean, var) of each norm that uses them, in order."""
    pairs = iter(zip(running[0::2], running[1::2]))
    return [None if batch else next(pairs) for batch in batch_stats]


def _batch_norm(x: Tensor, weight: Tensor, bias: Tensor, running: Optional[tuple[Tensor, Tensor]],
                eps: float) -> Tensor:
    weight, bias = (None if t.numel() == 0 else t for t in (weight, bias))
    mean, var = running if running is not None else (None, None)
    # ATen's op directly: torch 2.11's F.batch_norm refuses eps=0.
    return torch.batch_norm(x, weight, bias, mean, var, running is None, 0.0, eps, torch.backends.cudnn.enabled)


def stage_forward(x: Tensor, params: Sequence[Tensor], num_layers: int, has_transition: bool,
                  eps: Sequence[float], batch_stats: Sequence[bool],
                  eval_running: Sequence[Optional[tuple[Tensor, Tensor]]], drop_rates: Sequence[float],
                  masks: Sequence[Tensor]) -> Tensor:
    """The stage's output from ``x`` and ``params`` (the op's flat list), differentiably."""
    if x.numel() == 0 and x.dim() == 1:
        raise RuntimeError("double backward through a torch.compile'd densenet_fast stage is not supported")
    features = [x]
    for i in range(num_layers):
        w1, b1, conv1, w2, b2, conv2 = params[i * _PARAMS_PER_LAYER:(i + 1) * _PARAMS_PER_LAYER]
        h = _batch_norm(torch.cat(features, 1), w1, b1, eval_running[2 * i], eps[2 * i])
        h = F.conv2d(F.relu(h), conv1.to(x.dtype))
        h = _batch_norm(h, w2, b2, eval_running[2 * i + 1], eps[2 * i + 1])
        h = F.conv2d(F.relu(h), conv2.to(x.dtype), padding=1)
        p = drop_rates[i]
        if p > 0:
            h = h * masks[i] * (1.0 / (1.0 - p)) if p < 1 else h * 0.0
        features.append(h)
    out = torch.cat(features, 1) if num_layers else x
    if has_transition:
        wt, bt, convt = params[num_layers * _PARAMS_PER_LAYER:]
        h = F.relu(_batch_norm(out, wt, bt, eval_running[-1], eps[-1]))
        out = F.avg_pool2d(F.conv2d(h, convt.to(x.dtype)), 2)
    return out
