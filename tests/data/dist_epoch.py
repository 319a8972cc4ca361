"""Run under `composer -n RANKS`: one full epoch and one interrupted+resumed epoch; writes what each rank saw.

usage: composer -n RANKS tests/data/dist_epoch.py DATASET_DIR OUT_DIR BATCH_SIZE
"""

import json
import os
import sys

import torch
from composer.devices import DeviceCPU
from composer.utils import dist

from composer_prx.data.dataset import build_dataloader


def main(data: str, out: str, batch_size: int) -> None:
    dist.initialize_dist(DeviceCPU())
    rank = dist.get_global_rank()
    kwargs = dict(batch_size=batch_size, resolution=32, patch_size=4, seed=5)
    loader = build_dataloader(None, data, **kwargs)
    full = [{"caption": b["caption"], "shape": list(b["image"].shape[2:])} for b in loader]

    it = iter(loader)
    before = [next(it)["caption"] for _ in range(3)]
    local = torch.tensor([sum(len(c) for c in before)])
    dist.all_reduce(local)  # Composer's sample_in_epoch counts samples over all ranks
    state = loader.dataset.state_dict(int(local.item()), True)
    del it
    resumed = build_dataloader(None, data, **kwargs)
    resumed.dataset.load_state_dict(state)
    after = [b["caption"] for b in resumed]
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"full": full, "before": before, "after": after, "len": len(loader)}, f)
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
