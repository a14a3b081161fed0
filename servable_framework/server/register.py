"""``servable_framework.server.register``: the declarations used in ``servable_config.py`` (contract §3)."""

from servable_framework.servable.declare import (
    Model,
    add_stage,
    call_postprocess,
    call_postprocess_pipeline,
    call_preprocess,
    call_preprocess_pipeline,
    call_servable,
    declare_model,
    register_method,
    set_servable_options,
)


class Context:
    """Accepted for MindSpore compatibility (``Context(thread_num=...)``); device options are unused on PyTorch."""

    def __init__(self, **kwargs: object) -> None:
        self.options = dict(kwargs)
        self.device_infos: list[object] = []

    def append_device_info(self, info: object) -> None:
        if any(type(i) is type(info) for i in self.device_infos):
            raise RuntimeError(f"Device info of type {type(info).__name__} has already been appended")
        self.device_infos.append(info)


class CPUDeviceInfo:
    def __init__(self, **kwargs: object) -> None:
        self.options = dict(kwargs)


class GPUDeviceInfo(CPUDeviceInfo):
    pass


def declare_servable(servable_file: str, model_format: str, with_batch_dim: bool = True, options: object = None,
                     without_batch_dim_inputs: int | list[int] | None = None) -> Model:
    """Deprecated MindSpore name of `declare_model`."""
    return declare_model(servable_file, model_format, with_batch_dim, options, without_batch_dim_inputs)


__all__ = ["CPUDeviceInfo", "Context", "GPUDeviceInfo", "Model", "add_stage", "call_postprocess",
           "call_postprocess_pipeline", "call_preprocess", "call_preprocess_pipeline", "call_servable", "declare_model",
           "declare_servable", "register_method", "set_servable_options"]
