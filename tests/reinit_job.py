"""Run under torchrun by tests/test_hardening.py: loads, tears the job down, and loads again, three
times; each load initializes the process group anew."""

import os
import sys

import torch.distributed as dist

import tp_loader

for attempt in range(3):
    result = tp_loader.load(sys.argv[1], progress=False)
    sys.stdout.write(f"rank {dist.get_rank()} attempt {attempt}: {len(result.state_dict)} tensors\n")  # one write
    sys.stdout.flush()
    dist.destroy_process_group()
sys.stdout.flush()
os._exit(0)
