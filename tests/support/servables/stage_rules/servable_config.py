"""`stage_rules`: a local test servable with Python stages only, for the rule on exceptions from user stages
(`ValueError` = bad input, HTTP 400; anything else = a bug in the stage, HTTP 500)."""

import numpy as np

from servable_framework.server import register


def check(x):
    """x < 0: ValueError (the client's fault); x == 0: KeyError, x == 1: TypeError (bugs); else x * 2."""
    value = float(np.asarray(x).reshape(-1)[0])
    if value < 0:
        raise ValueError(f"x must be >= 0, got {value:g}")
    if value == 0:
        return {}["missing"]
    if value == 1:
        return len(value)
    return np.asarray(x) * 2


@register.register_method(output_names=["y"])
def double(x):
    y = register.add_stage(check, x, outputs_count=1)
    return y
