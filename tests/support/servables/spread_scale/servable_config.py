"""`spread_scale`: a test servable with one batched model, ``y = x * weight`` (``weight`` from
``{version}/scale.safetensors``, written by the test), batch size 2, for spreading a request's instances over
Workers (device Workers and extra workers).

Methods (each also answers ``pid``, the process id of the Worker that ran the instance):

* ``predict(x)``: a Python stage that refuses negative values (a per-instance error), then the model stage.
* ``via_call(x)``: a Python stage that runs the model with ``Model.call`` (MindSpore's in-stage call).
"""

import os

import numpy as np
import torch

from servable_framework.server import register


class Scale(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return x * self.weight


model = register.declare_model("scale.safetensors", "SafeTensors", with_batch_dim=True, module_factory=Scale,
                               max_batch_size=2)


def non_negative(x):
    x = np.asarray(x, np.float32)
    if (x < 0).any():
        raise ValueError("x must not be negative")
    return x


def tag(y):
    return y, np.array(os.getpid(), np.int64)


def scale_by_call(x):
    y = model.call(np.asarray(x, np.float32))
    return y, np.array(os.getpid(), np.int64)


@register.register_method(output_names=["y", "pid"])
def predict(x):
    x = register.add_stage(non_negative, x, outputs_count=1)
    y = register.add_stage(model, x, outputs_count=1)
    y, pid = register.add_stage(tag, y, outputs_count=2)
    return y, pid


@register.register_method(output_names=["y", "pid"])
def via_call(x):
    y, pid = register.add_stage(scale_by_call, x, outputs_count=2)
    return y, pid
