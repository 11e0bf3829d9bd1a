"""Tests never touch the network: make Hugging Face and timm fail fast instead of retrying downloads."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
