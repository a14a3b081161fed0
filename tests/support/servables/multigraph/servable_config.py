"""`multigraph`: one model declared from two files, i.e. two sub-graphs (contract §3.1, §3.2). Its programs are
exported by `export_model.py` (tests export them into a tmp copy; nothing binary is committed).

* sub-graph 0, ``affine.pt2``: ``(x, y) -> 2 * x + y``, float32 ``[batch, 3]`` each;
* sub-graph 1, ``stats.pt2``: ``z -> (z + 1, z.sum(1))``.

Methods: ``affine`` (``add_stage`` runs sub-graph 0), ``chain`` (a Python stage calls sub-graph 0 then 1 with
``Model.call``, one instance at a time), ``chain_batched`` (the same in a batched stage: one ``Model.call`` per
sub-graph with every instance), and ``misuse`` (input ``case`` picks a wrong ``Model.call``: its error text is
the answer).
"""

import numpy as np

from servable_framework.server import register

model = register.declare_model(model_file=["affine.pt2", "stats.pt2"], model_format="TorchExport",
                               with_batch_dim=True, max_batch_size=8)


@register.register_method(output_names=["z"])
def affine(x, y):
    z = register.add_stage(model, x, y, outputs_count=1)
    return z


def _f32(value):
    return np.asarray(value, np.float32)


def chain_one(x, y):
    z = model.call(_f32(x), _f32(y))  # one output: the value itself
    shifted, total = model.call(z, subgraph=1)  # two outputs: a tuple
    return z, shifted, total


@register.register_method(output_names=["z", "shifted", "total"])
def chain(x, y):
    z, shifted, total = register.add_stage(chain_one, x, y, outputs_count=3)
    return z, shifted, total


def chain_all(instances):
    zs = model.call([[_f32(x), _f32(y)] for x, y in instances])  # a list with one tuple per instance
    outs = model.call([[z] for (z,) in zs], subgraph=1)
    return [(z, shifted, total) for (z,), (shifted, total) in zip(zs, outs)]


@register.register_method(output_names=["z", "shifted", "total"])
def chain_batched(x, y):
    z, shifted, total = register.add_stage(chain_all, x, y, outputs_count=3, batch_size=0)
    return z, shifted, total


def _misuse(x, case):
    x = _f32(x)
    calls = {
        "no_inputs": lambda: model.call(),
        "format": lambda: model.call([x, x]),
        "no_instances": lambda: model.call([]),
        "too_many": lambda: model.call(x, x, x),
        "too_few": lambda: model.call(x),
        "too_many_batched": lambda: model.call([[x, x], [x, x, x]]),
        "too_few_batched": lambda: model.call([[x, x], [x]]),
        "too_many_subgraph1": lambda: model.call(x, x, subgraph=1),
        "bad_subgraph": lambda: model.call(x, subgraph=2),
        "size": lambda: model.call(x[:2], x),
        "dtype": lambda: model.call(x.astype(np.float64), x),
    }
    return calls[case]()


@register.register_method(output_names=["y"])
def misuse(x, case):
    y = register.add_stage(_misuse, x, case, outputs_count=1)
    return y
