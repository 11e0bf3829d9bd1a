"""Shared test settings.

Tests never touch the network: Hugging Face and timm fail fast instead of retrying downloads. Modules
that train tiny networks use the ``one_thread`` fixture: such networks run fastest on one thread, and
on shared CPUs more threads thrash.
"""

import os

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
