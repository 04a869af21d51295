"""Demo models train on one thread."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def one_thread() -> Iterator[None]:
    """Train on one thread: matrices this small gain little from a second one, a second thread
    stalls badly on a busy machine, and one thread rounds the same way whatever the core count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
