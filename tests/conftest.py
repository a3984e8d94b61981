"""Shared test setup: the repo root on sys.path (set here once), one torch thread, and one helper.

Most test tensors are small, where torch's intra-op threads cost more than they give; on a
shared 2-core machine two threads also spin against each other (measured 5-8x slower)."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(1)

from geometry import object_distance_matrix  # noqa: E402  (after sys.path)


def min_box_distance(scenes, pos, yaw):
    """Smallest rounded-box distance of each agent to any other over the steps: [B, A]."""
    yt = yaw.transpose(1, 2)                                              # [B, T', A]
    L, W = (scenes.size[:, None, :, k].expand_as(yt) for k in (0, 1))
    v = scenes.valid[:, :, :1].expand_as(yaw).transpose(1, 2)             # [B, T', A]
    return object_distance_matrix(pos.transpose(1, 2), yt, L, W, v).amin(dim=(1, 3))
