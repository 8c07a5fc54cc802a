"""compiler.memory: freed heap memory handed back to the OS between phases."""

from __future__ import annotations

import platform

import pytest
import torch

from compiler import memory


def test_release_free_memory_returns_a_bool_and_keeps_live_tensors():
    keep = torch.arange(1000, dtype=torch.float32)
    junk = [torch.ones(64, 1024) for _ in range(64)]  # 256 KB each: heap, not mmap
    del junk
    assert isinstance(memory.release_free_memory(), bool)
    assert torch.equal(keep, torch.arange(1000, dtype=torch.float32))


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="malloc_trim is glibc's")
def test_glibc_malloc_trim_is_found():
    assert memory._malloc_trim() is not None
