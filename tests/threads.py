"""One torch thread for tiny models.

Tiny models gain nothing from intra-op threads, and on a 2-core machine those threads fight the
other work of a test (an engine thread, an event loop, test clients) for the cores.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def single_torch_thread() -> Iterator[None]:
    """Run the block with one torch thread; the previous count is restored even if it raises."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
