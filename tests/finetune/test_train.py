"""Fine-tuning a tiny model on CPU: eval loss falls, the output reloads, exports and generates; resume."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from npctalk.engine.errors import ConfigError
from npctalk.finetune.checkpoint import list_checkpoints
from npctalk.finetune.config import FinetuneConfig
from npctalk.finetune.errors import FinetuneError

torch = pytest.importorskip("torch")

# Tiny random models need a large learning rate to move in a few steps; their persona prompts are long.
QUICK = FinetuneConfig(learning_rate=3e-3, max_steps=4, eval_every=2, batch_size=2, grad_accumulation=2,
                       max_length=1024, eval_max_new_tokens=6, log_every=1, early_stopping_patience=0)


def _base_eval_loss(folder: Path, valid: Path) -> float:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from npctalk.finetune.dataset import load_examples
    from npctalk.finetune.prompts import ExampleEncoder, engine_tokenizer, training_manifest
    from npctalk.finetune.train import eval_loss

    config, tok = AutoConfig.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    manifest = training_manifest(config, tok, "base", config.model_type, QUICK.max_length)
    encoder = ExampleEncoder(manifest, engine_tokenizer(tok))
    encoded = [encoder.encode(e) for e in load_examples(valid)]
    return eval_loss(AutoModelForCausalLM.from_pretrained(folder), encoded, 2, "cpu", None)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_finetune_lowers_eval_loss_and_the_output_exports_and_generates(
    family: str, request: pytest.FixtureRequest, tiny_data: tuple[Path, Path], tmp_path: Path,
) -> None:
    from transformers import AutoModelForCausalLM

    from npctalk.export.api import ExportOptions, export_bundle
    from npctalk.finetune.evaluate import EvalOptions, evaluate_bundle
    from npctalk.finetune.train import finetune

    source = request.getfixturevalue(f"tiny_{family}_dir")
    train, valid = tiny_data
    before = _base_eval_loss(source, valid)
    result = finetune(source, train, valid, tmp_path / "run", QUICK)
    assert result.steps == 4 and [h["step"] for h in result.history] == [2, 4]
    assert result.best_eval_loss < before, (before, result.history)
    # The output root holds the best model, loadable by transformers …
    reloaded = AutoModelForCausalLM.from_pretrained(result.output)
    assert reloaded.config.use_cache is True
    # … and by export-onnx; the bundle's reference perplexity is the training eval loss, through the engine.
    bundle = export_bundle(result.output, tmp_path / "bundle", ExportOptions())
    report = evaluate_bundle(bundle, valid, EvalOptions(max_new_tokens=6, provider="cpu"))
    assert report.examples == 4 and len(report.samples) == 4
    assert report.metrics["perplexity"] == pytest.approx(math.exp(result.best_eval_loss), rel=1e-3)
    assert all(math.isfinite(v) for v in report.metrics.values())


@pytest.mark.slow
def test_resume_continues_the_step_count_and_matches_an_uninterrupted_run(
    tiny_gpt2_dir: Path, tiny_data: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import npctalk.finetune.train as train_module
    from npctalk.finetune.train import finetune

    train, valid = tiny_data
    config = dataclasses.replace(QUICK, max_steps=2, eval_every=1)
    full = finetune(tiny_gpt2_dir, train, valid, tmp_path / "full", config)

    real_save = train_module.save_checkpoint

    def save_then_crash(*args: object, **kwargs: object) -> Path:
        real_save(*args, **kwargs)  # type: ignore[arg-type]
        raise KeyboardInterrupt  # killed right after the first checkpoint

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        finetune(tiny_gpt2_dir, train, valid, tmp_path / "cut", config)
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(tmp_path / "cut")] == ["step-1"]

    resumed = finetune(tiny_gpt2_dir, train, valid, tmp_path / "cut", config, resume="latest")
    assert resumed.steps == 2 and [h["step"] for h in resumed.history] == [1, 2]
    assert [p.name for p in list_checkpoints(tmp_path / "cut")] == ["step-2"]
    for got, want in zip(resumed.history, full.history, strict=True):
        assert got["eval_loss"] == pytest.approx(want["eval_loss"], rel=1e-5)
    a = torch.load(tmp_path / "full/checkpoints/step-2/optimizer.pt", weights_only=True)["state"]
    b = torch.load(tmp_path / "cut/checkpoints/step-2/optimizer.pt", weights_only=True)["state"]
    assert a.keys() == b.keys() and all(torch.allclose(a[k]["exp_avg"], b[k]["exp_avg"], atol=1e-6) for k in a)


def test_output_and_resume_errors(tiny_data: tuple[Path, Path], tmp_path: Path) -> None:
    from npctalk.finetune.train import finetune

    train, valid = tiny_data
    with pytest.raises(FinetuneError, match="holds no complete checkpoint"):
        finetune("unused", train, valid, tmp_path / "empty", QUICK, resume="latest")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "something").write_text("x")
    with pytest.raises(FinetuneError, match="--resume latest"):
        finetune(tmp_path / "no-model", train, valid, busy, QUICK)


def test_bad_data_fails_before_any_model_is_loaded(tiny_data: tuple[Path, Path], tmp_path: Path) -> None:
    from npctalk.finetune.errors import DatasetError
    from npctalk.finetune.train import finetune

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Hi", "completion": "Hello"}\n{"prompt": "Hi"}\n', encoding="utf-8")
    with pytest.raises(DatasetError, match=rf"^{bad}:2: "):
        finetune(tmp_path / "no-such-model", bad, tiny_data[1], tmp_path / "out", QUICK)
    assert not (tmp_path / "out").exists()


def test_config_defaults_and_validation() -> None:
    d = FinetuneConfig()
    assert (d.learning_rate, d.warmup_ratio, d.schedule, d.batch_size, d.grad_accumulation, d.weight_decay,
            d.max_grad_norm, d.gradient_checkpointing, d.eval_every, d.early_stopping_patience, d.epochs,
            d.precision) == (1e-5, 0.1, "cosine", 2, 8, 0.01, 1.0, True, 0.05, 3, 5.0, "auto")
    assert d.total_steps(252) == 5 * 16 and d.eval_interval(80) == 4 and FinetuneConfig(eval_every=500).eval_interval(80) == 500
    with pytest.raises(ConfigError, match="learning_rate.*warmup_ratio"):
        FinetuneConfig(learning_rate=0, warmup_ratio=1.5)
    with pytest.raises(ConfigError, match="schedule must be one of"):
        FinetuneConfig(schedule="step")


def test_the_better_model_follows_select_by() -> None:
    from npctalk.finetune.checkpoint import TrainState

    best = TrainState(best_step=4, best_bleu=1.0, best_loss=3.4)
    assert best.improves(1.1, 3.5) and not best.improves(0.9, 3.3)  # BLEU decides (the recipe)
    assert best.improves(1.0, 3.3) and not best.improves(1.0, 3.5)  # equal BLEU: the loss breaks the tie
    assert best.improves(0.9, 3.3, "loss") and not best.improves(1.1, 3.5, "loss")
    assert best.improves(1.1, 3.4, "loss") and not best.improves(0.9, 3.4, "loss")  # equal loss: BLEU
    with pytest.raises(ConfigError, match="select_by must be one of bleu, loss"):
        FinetuneConfig(select_by="chrf")


@pytest.mark.parametrize("select_by", ["bleu", "loss"])
def test_the_kept_step_follows_select_by(select_by: str, tiny_data: tuple[Path, Path], tiny_llama_dir: Path,
                                         tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from npctalk.finetune import train

    bleus = iter([10.0, 9.0, 8.0, 7.0])  # BLEU falls while the loss falls: the two choices disagree
    monkeypatch.setattr(train, "corpus_bleu", lambda replies, refs: next(bleus))
    config = dataclasses.replace(QUICK, max_steps=4, eval_every=1, select_by=select_by)
    result = train.finetune(tiny_llama_dir, tiny_data[0], tiny_data[1], tmp_path / "run", config)
    losses = {h["step"]: h["eval_loss"] for h in result.history}
    assert len(losses) == 4 and min(losses, key=losses.__getitem__) != 1, losses
    if select_by == "loss":
        assert result.best_step == min(losses, key=losses.__getitem__)
        assert result.best_eval_loss == min(losses.values())
    else:
        assert result.best_step == 1 and result.best_bleu == 10.0


def test_a_hint_when_bleu_stops_the_run_while_the_loss_falls() -> None:
    from npctalk.finetune.checkpoint import TrainState
    from npctalk.finetune.train import loss_still_falling

    history = [{"step": 4, "eval_loss": 3.59, "eval_bleu": 0.45}, {"step": 8, "eval_loss": 3.46, "eval_bleu": 1.08},
               {"step": 12, "eval_loss": 3.29, "eval_bleu": 1.06}]
    state = TrainState(step=12, total_steps=80, best_step=8, best_bleu=1.08, best_loss=3.46, stopped_early=True,
                       history=history)
    hint = loss_still_falling(state, FinetuneConfig())
    assert hint is not None and "step 12 of 80" in hint and "3.4600 at the kept step 8" in hint and "--select-by loss" in hint
    assert loss_still_falling(dataclasses.replace(state, stopped_early=False), FinetuneConfig()) is None
    assert loss_still_falling(state, FinetuneConfig(select_by="loss")) is None
    rising = dataclasses.replace(state, history=[*history[:2], {"step": 12, "eval_loss": 3.50, "eval_bleu": 1.0}])
    assert loss_still_falling(rising, FinetuneConfig()) is None
