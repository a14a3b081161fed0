"""Export the two sub-graphs of `multigraph` (see its servable_config.py) into ``{servable_dir}/multigraph/1/``."""

from __future__ import annotations

import os
import shutil

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


class Affine(torch.nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 2 * x + y


class Stats(torch.nn.Module):
    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return z + 1, z.sum(dim=1)


def export_programs(version_dir: str) -> None:
    """``affine.pt2`` and ``stats.pt2``, float32 ``[batch, 3]`` inputs with a dynamic batch dim."""
    os.makedirs(version_dir, exist_ok=True)
    batch = torch.export.Dim("batch", max=64)
    x, y = torch.ones(2, 3), torch.ones(2, 3)  # two tensors: one passed twice would be traced as one input
    torch.export.save(torch.export.export(Affine(), (x, y), dynamic_shapes=({0: batch}, {0: batch})),
                      os.path.join(version_dir, "affine.pt2"))
    torch.export.save(torch.export.export(Stats(), (x,), dynamic_shapes=({0: batch},)),
                      os.path.join(version_dir, "stats.pt2"))


def export(servable_dir: str, name: str = "multigraph", config: str | None = None) -> str:
    """A servable ``{servable_dir}/{name}`` with both programs in version 1 and ``config`` (default: this
    folder's servable_config.py) as its servable_config.py; returns its folder."""
    folder = os.path.join(servable_dir, name)
    export_programs(os.path.join(folder, "1"))
    if config is None:
        shutil.copy(os.path.join(HERE, "servable_config.py"), os.path.join(folder, "servable_config.py"))
    else:
        with open(os.path.join(folder, "servable_config.py"), "w") as f:
            f.write(config)
    return folder
