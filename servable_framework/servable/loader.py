"""Import a servable's ``servable_config.py`` into a fresh builder and check the result (contract §2, §3)."""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass

from servable_framework.servable.declare import Model, ServableBuilder
from servable_framework.servable.spec import MethodSpec, ServableSpec


@dataclass
class LoadedServable:
    spec: ServableSpec
    handles: list[Model]


def check_servable_dir(directory: str, name: str) -> None:
    """The checks `start_servables` performs before spawning anything."""
    path = os.path.join(directory, name)
    if not os.path.isdir(path):
        raise RuntimeError(f"Check servable config failed, directory '{path}' not exist")
    if not os.path.isfile(os.path.join(path, "servable_config.py")):
        raise RuntimeError(f"Check servable config failed, file '{os.path.join(path, 'servable_config.py')}' "
                           f"not exist")


def newest_version(directory: str, name: str) -> int:
    """Largest all-digit sub-directory name of ``{directory}/{name}``; 0 when there is none."""
    path = os.path.join(directory, name)
    versions = [int(d) for d in os.listdir(path) if d.isdigit() and os.path.isdir(os.path.join(path, d))]
    return max(versions, default=0)


def resolve_version(directory: str, name: str, requested: int, has_models: bool) -> int:
    """Turn ``version_number`` (0 = newest) into a real version, with MindSpore's errors."""
    if not has_models:
        return requested or max(newest_version(directory, name), 1)
    if requested == 0:
        newest = newest_version(directory, name)
        if newest == 0:
            raise RuntimeError("There is no valid version directory of models")
        return newest
    if not os.path.isdir(os.path.join(directory, name, str(requested))):
        raise RuntimeError(f"There is no specified version directory of models, specified version number: "
                           f"{requested}")
    return requested


def load_servable(directory: str, name: str) -> LoadedServable:
    """Import ``{directory}/{name}/servable_config.py`` as module ``{name}.servable_config``."""
    check_servable_dir(directory, name)
    builder = ServableBuilder(name, directory)
    if directory not in sys.path:
        sys.path.insert(0, directory)
    module = f"{name}.servable_config"
    sys.modules.pop(module, None)
    with builder.active():
        try:
            importlib.import_module(module)
        except Exception as exc:
            raise RuntimeError(f"import {module} failed, {exc}") from exc
    spec = builder.spec
    if not spec.methods:
        raise RuntimeError(f"There is no method registered for servable '{name}'")
    for method in spec.methods.values():
        for k, stage in enumerate(method.stages, start=1):
            for ref in stage.inputs:
                _check_ref(method, ref.stage, ref.index, k)
        for ref in method.returns:
            _check_ref(method, ref.stage, ref.index, len(method.stages) + 1)
    return LoadedServable(spec, builder.handles)


def _check_ref(method: MethodSpec, stage: int, index: int, at: int) -> None:
    """Stage ``at`` may only read an existing output of an earlier stage (0 = the method inputs)."""
    count = len(method.input_names) if stage == 0 else (
        method.stages[stage - 1].outputs_count if 0 < stage < at else -1)
    if not 0 <= index < count:
        raise RuntimeError(f"Method {method.name}: stage {at} uses output {index} of stage {stage}, which does not "
                           f"exist")
