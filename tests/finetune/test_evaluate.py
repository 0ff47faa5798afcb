"""Evaluation through the engine: report contents, the optional consistency section, the CLI."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

import pytest

from npctalk.engine.cli import main
from npctalk.engine.sampling import CHAT_DEFAULTS
from npctalk.finetune.evaluate import EvalOptions, evaluate_bundle
from npctalk.finetune.report import EvalReport, comparison_table


def test_report_scores_engine_replies_and_renders_markdown(gpt2_bundle: Path, tiny_data: tuple[Path, Path],
                                                         tmp_path: Path) -> None:
    valid = tiny_data[1]
    options = EvalOptions(max_new_tokens=6, provider="cpu")
    report = evaluate_bundle(gpt2_bundle, valid, options)
    again = evaluate_bundle(gpt2_bundle, valid, options)
    assert [s.prediction for s in report.samples] == [s.prediction for s in again.samples]  # greedy: reproducible
    assert report.examples == 4 and report.consistency is None
    m = report.metrics
    assert 0 <= m["bleu"] <= 100 and 0 <= m["chrf"] <= 100 and 0 <= m["dist1"] <= 1 and 0 <= m["dist2"] <= 1
    assert m["perplexity"] > 1 and math.isfinite(m["perplexity"])
    json_path, md_path = report.write(tmp_path, "gpt2")
    assert EvalReport.from_json(json_path.read_text(encoding="utf-8")) == report
    markdown = md_path.read_text(encoding="utf-8")
    assert "| BLEU |" in markdown and "## Persona consistency" in markdown and "Not run" in markdown
    assert report.samples[0].reference in markdown


def test_consistency_scorer_fills_its_section(gpt2_bundle: Path, tiny_data: tuple[Path, Path]) -> None:
    seen = []

    def scorer(model: object) -> dict[str, float]:
        seen.append(model)
        return {"consistent_share": 0.75}

    report = evaluate_bundle(gpt2_bundle, tiny_data[1], EvalOptions(max_new_tokens=4, limit=1, provider="cpu"),
                             consistency=scorer)
    assert len(seen) == 1 and report.examples == 1
    assert report.consistency == {"consistent_share": 0.75}
    assert "| consistent_share | 0.750 |" in report.to_markdown()
    table = comparison_table([report, report])
    assert table.count("\n") == 4 and "consistency: consistent_share" in table


def test_sampled_decoding_is_fixed_by_the_seed(llama_bundle: Path, tiny_data: tuple[Path, Path]) -> None:
    runs = [evaluate_bundle(llama_bundle, tiny_data[1], EvalOptions(max_new_tokens=8, temperature=1.0, seed=s,
                                                                   limit=2, provider="cpu")) for s in (3, 3)]
    assert [x.prediction for x in runs[0].samples] == [x.prediction for x in runs[1].samples]
    assert runs[0].decoding["temperature"] == 1.0 and runs[0].decoding["seed"] == 3
    shipped = EvalOptions.shipped(seed=5, limit=2, provider="cpu")
    assert shipped.search_options() == dataclasses.replace(CHAT_DEFAULTS, seed=5)
    shipped_run = evaluate_bundle(llama_bundle, tiny_data[1], shipped)
    assert shipped_run.decoding["repetition_penalty"] == CHAT_DEFAULTS.repetition_penalty
    assert shipped_run.decoding["fact_bias"] == CHAT_DEFAULTS.fact_bias > 0, "steered as chat and serve are"
    assert runs[0].decoding["fact_bias"] == 0.0, "plain evaluation decodes without steering"


def test_evaluate_cli_writes_reports_and_comparison(gpt2_bundle: Path, llama_bundle: Path,
                                                     tiny_data: tuple[Path, Path], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "results"
    code = main(["evaluate", str(gpt2_bundle), str(llama_bundle), "--data", str(tiny_data[1]), "-o", str(out),
                 "--max-new-tokens", "4", "--limit", "2", "--provider", "cpu"])
    assert code == 0
    table = capsys.readouterr().out
    assert table == (out / "comparison.md").read_text(encoding="utf-8") and table.count("\n") == 4
    for name in ("gpt2", "llama"):
        data = json.loads((out / f"{name}.json").read_text(encoding="utf-8"))
        assert data["examples"] == 2 and set(data["metrics"]) >= {"bleu", "chrf", "dist1", "dist2", "perplexity"}


def test_cli_reports_bad_data_with_file_and_line(gpt2_bundle: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "test.jsonl"
    bad.write_text('{"prompt": "Hi", "completion": "Hello"}\nnot json\n', encoding="utf-8")
    assert main(["evaluate", str(gpt2_bundle), "--data", str(bad), "-o", str(tmp_path / "r")]) == 1
    assert f"error: {bad}:2: not valid JSON" in capsys.readouterr().err
    assert main(["finetune", "default", "--train", str(bad), "--valid", str(bad), "-o", str(tmp_path / "o")]) == 1
    assert f"error: {bad}:2: not valid JSON" in capsys.readouterr().err


def test_evaluate_without_the_finetune_extra_fails_before_generating(gpt2_bundle: Path, tiny_data: tuple[Path, Path],
                                                                    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """A game's runtime-only install has no sacrebleu: evaluate says which extra to install before
    it spends minutes generating replies it could not score."""
    import npctalk.finetune.evaluate as evaluate

    def generate(*args: object, **kwargs: object) -> None:
        raise AssertionError("generated replies without the package that scores them")

    monkeypatch.setitem(sys.modules, "sacrebleu", None)  # import sacrebleu → ImportError
    monkeypatch.setattr(evaluate, "evaluate_bundle", generate)
    assert main(["evaluate", str(gpt2_bundle), "--data", str(tiny_data[1]), "-o", str(tmp_path / "r")]) == 1
    assert "error: evaluate needs the finetune extra: pip install 'npctalk[finetune]'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_finetune_cli_trains_and_prints_the_output(tiny_llama_dir: Path, tiny_data: tuple[Path, Path], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    train, valid = tiny_data
    out = tmp_path / "run"
    args = ["finetune", str(tiny_llama_dir), "--train", str(train), "--valid", str(valid), "-o", str(out),
            "--max-steps", "1", "--grad-accumulation", "1", "--lr", "1e-3", "--max-length", "1024",
            "--eval-max-new-tokens", "2", "--no-gradient-checkpointing"]
    assert main(args) == 0
    assert capsys.readouterr().out.strip() == str(out)
    run = json.loads((out / "finetune.json").read_text(encoding="utf-8"))
    assert run["config"]["learning_rate"] == 1e-3 and run["config"]["gradient_checkpointing"] is False
    assert run["state"]["step"] == 1 and (out / "config.json").is_file() and (out / "LICENSE").is_file()
    assert main(args) == 1  # the folder now holds a run
    assert "--resume latest" in capsys.readouterr().err


@pytest.mark.slow
def test_engine_consistency_lands_in_the_report(llama_bundle: Path, tiny_data: tuple[Path, Path]) -> None:
    """``--with-consistency`` wiring: issue 5's scripted probes, one share per memory × reranking setting."""
    from npctalk.finetune.evaluate import engine_consistency

    report = evaluate_bundle(llama_bundle, tiny_data[1], EvalOptions(max_new_tokens=4, limit=1, provider="cpu"),
                             consistency=engine_consistency(max_new_tokens=8))
    assert report.consistency is not None
    assert set(report.consistency) == {f"memory {m}, rerank {r}" for m in ("on", "off") for r in ("on", "off")}
    assert all(0.0 <= v <= 1.0 for v in report.consistency.values())
    assert "consistency: memory on, rerank off" in comparison_table([report])
