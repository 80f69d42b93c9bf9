"""write_gguf with F32: the float file llama.cpp's own quantizer starts from holds the weights exactly."""

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from lmpress.formats.gguf import gguf_tensors, write_gguf  # noqa: E402
from tests.test_gguf_writer import bpe_tokenizer, tiny_llama  # noqa: E402


def test_f32_file_holds_the_float_weights(tmp_path):
    model = tiny_llama(hidden=64, inter=96)
    path = tmp_path / "m.F32.gguf"
    types = write_gguf(model, bpe_tokenizer(), path, "F32", {}, embed_type="F32", pre="default")
    assert set(types.values()) == {"F32"}
    r = gguf.GGUFReader(path)
    assert r.fields["general.file_type"].contents() == int(gguf.LlamaFileType.ALL_F32)
    want = {name: data for name, _, data in gguf_tensors(model, "F32", "F32")}
    for t in r.tensors:
        assert np.array_equal(np.asarray(t.data).reshape(want[t.name].shape), want[t.name]), t.name
