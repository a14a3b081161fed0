"""The distributed `matmul` servable: y = -(x @ W), W column-split over 8 Agents (MindSpore's example)."""

from servable_framework.server import distributed, register

model = distributed.declare_servable(rank_size=8, stage_size=1, with_batch_dim=False, shard="matmul")


@register.register_method(output_names=["y"])
def predict(x):
    y = register.add_stage(model, x, outputs_count=1)
    return y
