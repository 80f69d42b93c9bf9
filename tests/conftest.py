import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(1)  # tiny models: a second thread only adds synchronisation (770 ms vs 2-8 ms per forward on a busy machine)


@pytest.fixture
def llama():
    from tiny import tiny_model

    return tiny_model("llama")


class ByteTokenizer:
    """A minimal tokenizer for tests: one token per byte, BOS = 1 (ids 0-2 reserved)."""

    bos_token_id = 1
    eos_token_id = 2

    def __call__(self, text, add_special_tokens=False):
        ids = [3 + (b % 253) for b in text.encode()]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}


@pytest.fixture
def byte_tok():
    return ByteTokenizer()


def pytest_collection_modifyitems(config, items):
    """Tests that use the built C++ kernel (the ``kernel`` fixture) carry the ``cext`` marker."""
    for item in items:
        if "kernel" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.cext)
