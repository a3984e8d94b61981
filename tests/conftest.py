"""Shared test setup: the repo root on sys.path, and one torch thread.

Most test tensors are small, where torch's intra-op threads cost more than they give; on a
shared 2-core machine two threads also spin against each other (measured 5-8x slower)."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(1)
