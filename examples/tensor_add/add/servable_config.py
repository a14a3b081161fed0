"""The `add` servable: a 2x2 float32 add model (MindSpore Serving's add example, on PyTorch)."""

import numpy as np

from servable_framework.server import register


def add_trans_datatype(x1, x2):
    """Preprocess: cast both inputs to float32 (two inputs, two outputs)."""
    # np.asarray: a non-numeric input (a string) fails with ValueError, i.e. a clean "bad input" (HTTP 400)
    return np.asarray(x1).astype(np.float32), np.asarray(x2).astype(np.float32)


# with_batch_dim=False: the model takes exactly one 2x2 instance per call.
tensor_add_model = register.declare_model(model_file="tensor_add.pt2", model_format="TorchExport",
                                          with_batch_dim=False)


@register.register_method(output_names=["y"])
def add_common(x1, x2):  # float32 inputs only
    """y = x1 + x2, straight into the model."""
    y = register.add_stage(tensor_add_model, x1, x2, outputs_count=1)
    return y


@register.register_method(output_names=["y"])
def add_cast(x1, x2):
    """Cast any numeric inputs to float32 first, then add."""
    x1, x2 = register.add_stage(add_trans_datatype, x1, x2, outputs_count=2)
    y = register.add_stage(tensor_add_model, x1, x2, outputs_count=1)
    return y
