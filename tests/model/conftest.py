"""Fixtures shared by the model tests: one synthetic tokenizer, loaded by us and by transformers."""

import pytest

from model.synth_tokenizer import write_synthetic_tokenizer
from model.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    write_synthetic_tokenizer(path, num_merges=256, seed=0)
    return path


@pytest.fixture(scope="session")
def tok(tok_dir):
    return Tokenizer.from_dir(tok_dir)


@pytest.fixture(scope="session")
def hf(tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tok_dir))
