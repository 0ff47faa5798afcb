"""engine/perplexity.py: exp(mean NLL) equal to transformers' on the same ids, sliding windows exact, bad input."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from npctalk.engine.errors import ConfigError
from npctalk.engine.model import Model
from npctalk.engine.perplexity import perplexity, perplexity_of_ids

HELDOUT = Path(__file__).resolve().parents[2] / "data" / "heldout" / "npc_heldout.txt"


def _text(chars: int) -> str:
    return HELDOUT.read_text(encoding="utf-8")[:chars]


def _hf_log_probs(hf_dir: Path, ids: list[int]) -> np.ndarray:
    """log p(ids[t] | ids[:t]) for t = 1..n-1 from the PyTorch model (float64)."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()  # (n, vocab)
    log_probs = torch.log_softmax(logits[:-1], dim=-1)
    return log_probs[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].numpy()


@pytest.fixture(scope="module")
def lean_bundles(tiny_gpt2_dir: Path, tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same tiny models through ``--graph lean``: logits of the last position only."""
    from npctalk.export.api import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("lean")
    return {name: export_bundle(src, out / name, ExportOptions(dtype="fp32", graph="lean"))
            for name, src in (("gpt2", tiny_gpt2_dir), ("llama", tiny_llama_dir))}


@pytest.fixture(params=["gpt2", "llama", "gpt2-lean", "llama-lean"])
def family(request: pytest.FixtureRequest) -> tuple[Model, Path]:
    name, _, graph = request.param.partition("-")
    bundle = request.getfixturevalue("lean_bundles")[name] if graph else request.getfixturevalue(f"{name}_bundle")
    return Model(bundle, provider="cpu"), request.getfixturevalue(f"tiny_{name}_dir")


def test_one_window_equals_exp_mean_nll_from_transformers(family: tuple[Model, Path]) -> None:
    model, hf_dir = family
    text = _text(300)
    ids = model.tokenizer.encode(text)
    assert 50 < len(ids) <= model.manifest.max_context
    result = perplexity(model, text, window=len(ids), stride=len(ids) - 1)
    expected = math.exp(-_hf_log_probs(hf_dir, ids).mean())
    assert result.tokens == len(ids) and result.tokens_scored == len(ids) - 1 and result.windows == 1
    assert result.perplexity == pytest.approx(expected, rel=1e-4)
    assert result.mean_nll == pytest.approx(math.log(expected), rel=1e-4)


@pytest.mark.parametrize(("window", "stride"), [(32, 16), (32, 31), (40, 7)])
def test_sliding_window_scores_each_token_once_with_its_windows_context(
        family: tuple[Model, Path], window: int, stride: int) -> None:
    model, hf_dir = family
    ids = model.tokenizer.encode(_text(200))
    n = len(ids)
    assert n > 2 * window
    result = perplexity_of_ids(model, ids, window=window, stride=stride)
    # Reference, token by token: token t gets the `window` tokens ending with its chunk of `stride`
    # targets ([1, 1 + stride), [1 + stride, 1 + 2 * stride), ...) as context, up to itself.
    nll, windows = 0.0, 0
    for first in range(1, n, stride):
        end = min(first + stride, n)
        begin = max(0, end - window)
        chunk = _hf_log_probs(hf_dir, ids[begin:end])  # index j: token begin + j + 1
        nll -= sum(chunk[t - begin - 1] for t in range(first, end))
        assert first - begin >= min(first, window - stride)  # context promised by the docstring
        windows += 1
    assert result.tokens_scored == n - 1 and result.windows == windows
    assert result.perplexity == pytest.approx(math.exp(nll / (n - 1)), rel=1e-4)
    # A short window really loses context: not the one-window number.
    full = perplexity_of_ids(model, ids, window=n, stride=n - 1)
    assert abs(full.mean_nll - result.mean_nll) > 1e-6


def test_default_window_is_capped_by_the_context(gpt2_bundle: Path) -> None:
    model = Model(gpt2_bundle, provider="cpu")
    result = perplexity(model, _text(120))
    assert result.window == min(1024, model.manifest.max_context) and result.windows == 1


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"window": 4096}, "window must be between 2 and the model's context"),
    ({"window": 1}, "window must be between 2"),
    ({"window": 16, "stride": 16}, "stride must be between 1 and the window minus one"),
    ({"window": 16, "stride": 0}, "stride must be between 1"),
])
def test_bad_window_or_stride_is_named(gpt2_bundle: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        perplexity(Model(gpt2_bundle, provider="cpu"), _text(200), **kwargs)


def test_too_short_text_is_an_error(gpt2_bundle: Path) -> None:
    with pytest.raises(ConfigError, match="at least 2 tokens"):
        perplexity_of_ids(Model(gpt2_bundle, provider="cpu"), [5])
