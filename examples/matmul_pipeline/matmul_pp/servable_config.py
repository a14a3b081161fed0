"""`matmul_pp`: a 2-stage pipeline of column-parallel MatMul layers, 2 TP ranks per stage (4 Agents).

Stage 0: h = x @ W0 (W0 [96, 96] = identity, columns split over its 2 ranks, all-gathered);
stage 1: y = -(h @ W1) (W1 [96, 16] = 0.5). For x = ones([rows, 96]) every value of y is -48.0.
Instances of concurrent requests are batched; with enable_pipeline_infer two batches are in flight
(stage 0 works on the next batch while stage 1 finishes the previous one).
"""

from servable_framework.server import distributed, register

model = distributed.declare_servable(rank_size=4, stage_size=2, with_batch_dim=True, enable_pipeline_infer=True,
                                     shard="matmul", max_batch_size=8, max_batch_delay_ms=2)


@register.register_method(output_names=["y"])
def predict(x):
    y = register.add_stage(model, x, outputs_count=1)
    return y
