"""prmkd-dist: distil several large pre-trained recommenders into one small, fast student.

Id conventions used everywhere (files, tensors, losses):
- items are contiguous ids 0..C-1 and these ids ARE the columns of the student's logits;
- users are contiguous ids 0..U-1;
- PAD_ID = -1 is the reserved padding / empty-slot id (left padding of histories, empty teacher
  slots, "no target"); it is never a real item.
"""
from prmkd_dist.constants import PAD_ID

__version__ = "0.1.0"

__all__ = ["PAD_ID", "__version__"]
