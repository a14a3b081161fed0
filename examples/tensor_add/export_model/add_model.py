"""Export the 2x2 float32 add model as a torch.export program: ../add/1/tensor_add.pt2."""

import os
import sys

import torch


class Net(torch.nn.Module):
    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        return x1 + x2


def export(servable_dir: str) -> str:
    path = os.path.join(servable_dir, "add", "1", "tensor_add.pt2")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    example = (torch.ones(2, 2, dtype=torch.float32), torch.ones(2, 2, dtype=torch.float32))
    torch.export.save(torch.export.export(Net(), example), path)
    return path


if __name__ == "__main__":
    here = os.path.dirname(os.path.realpath(sys.argv[0]))
    print("exported", export(os.path.join(here, "..")))
