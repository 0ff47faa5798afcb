"""bench/finetune_delta.py: a fine-tuned model packed as a delta against its base and rebuilt."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from bench import finetune_delta  # noqa: E402


@pytest.fixture()
def tuned(tiny_llama_dir: Path, tmp_path: Path) -> Path:
    """The tiny Llama with every weight moved by a few 1e-4, as a short fine-tune moves them."""
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 3e-4)
    out = tmp_path / "tuned"
    model.save_pretrained(out)
    transformers.AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(out)
    (out / "finetune.json").write_text('{"state": "kept"}')
    return out


def _weights(folder: Path) -> dict[str, np.ndarray]:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    return {k: v.numpy().copy() for k, v in model.state_dict().items()}


def test_rebuilt_model_has_the_tuned_weights(tiny_llama_dir: Path, tuned: Path, tmp_path: Path) -> None:
    packed, rebuilt = tmp_path / "packed", tmp_path / "rebuilt"
    finetune_delta.pack(tuned, str(tiny_llama_dir), packed)
    assert {"index.json", "check.npz", "run.tgz", "piece00"} <= {p.name for p in packed.iterdir()}
    diff = finetune_delta.unpack(packed, str(tiny_llama_dir), rebuilt, atol=1e-2)
    assert diff < 1e-2
    want, got, base = _weights(tuned), _weights(rebuilt), _weights(tiny_llama_dir)
    for name in want:
        moved = np.abs(want[name] - base[name]).max()
        assert moved > 1e-4, name  # the fixture moved it: the comparison below can fail
        # int8 per row: at most half a step of the row's largest change
        assert np.abs(got[name] - want[name]).max() <= moved / 254 + 1e-7, name
    assert (rebuilt / "finetune.json").read_text() == '{"state": "kept"}'  # the run's own files ride along
    assert (rebuilt / "tokenizer.json").exists()


def test_missing_piece_is_refused(tiny_llama_dir: Path, tuned: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(finetune_delta, "PIECE_BYTES", 4096)
    packed = tmp_path / "packed"
    finetune_delta.pack(tuned, str(tiny_llama_dir), packed)
    pieces = sorted(packed.glob("piece*"))
    assert len(pieces) > 2
    pieces[1].unlink()
    with pytest.raises(SystemExit, match="do not make the packed delta"):
        finetune_delta.unpack(packed, str(tiny_llama_dir), tmp_path / "rebuilt", atol=1e-2)
    assert not (tmp_path / "rebuilt" / "model.safetensors").exists()


def test_other_base_is_caught_by_the_logits(tiny_llama_dir: Path, tuned: Path, tmp_path: Path) -> None:
    packed, other = tmp_path / "packed", tmp_path / "other-base"
    finetune_delta.pack(tuned, str(tiny_llama_dir), packed)
    shutil.copytree(tiny_llama_dir, other)
    model = transformers.AutoModelForCausalLM.from_pretrained(other)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    model.save_pretrained(other)
    with pytest.raises(SystemExit, match="logits differ"):
        finetune_delta.unpack(packed, str(other), tmp_path / "rebuilt", atol=1e-2)
    assert not (tmp_path / "rebuilt" / "model.safetensors").exists()
