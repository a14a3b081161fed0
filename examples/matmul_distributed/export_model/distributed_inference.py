"""Write each rank's shard of W ([96, 16] filled with 0.5, column-split): model/device{i}/matmul.safetensors.

Usage (from examples/matmul_distributed): python export_model/distributed_inference.py [--ranks 8] [--stages 1]
With --stages S every stage but the last is a [K, K] identity layer, the last is W ([K, 16]); see agents/matmul.py.
"""

import argparse
import os
import sys

import torch
from safetensors.torch import save_file


def export(out_dir: str, ranks: int = 8, stages: int = 1, k: int = 96, n: int = 16) -> list[str]:
    tp = ranks // stages
    paths = []
    for rank in range(ranks):
        stage, tp_rank = divmod(rank, tp)
        cols = n if stage == stages - 1 else k
        if cols % tp:
            raise ValueError(f"{cols} columns do not split over {tp} ranks")
        # the last stage holds W (0.5); earlier stages an identity layer, so the answer stays exactly -48
        full = torch.full((k, cols), 0.5) if stage == stages - 1 else torch.eye(k)
        part = full[:, tp_rank * cols // tp:(tp_rank + 1) * cols // tp].contiguous()
        path = os.path.join(out_dir, f"device{rank}", "matmul.safetensors")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_file({"w": part}, path)
        paths.append(path)
    return paths


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--stages", type=int, default=1)
    args = parser.parse_args()
    here = os.path.dirname(os.path.realpath(sys.argv[0]))
    for p in export(os.path.join(here, "..", "model"), args.ranks, args.stages):
        print("wrote", os.path.normpath(p))
