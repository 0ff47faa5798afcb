"""The evaluation report: one JSON file for machines, one markdown page for people, and a table that
puts several reports side by side (before/after fine-tuning). Torch-free.

The "Persona consistency" section is optional: it appears when a consistency scorer ran (issue 5,
``npctalk evaluate --consistency``), and says "not run" otherwise.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# Metric key → (column title, format, what it measures)
METRICS = {
    "bleu": ("BLEU", "{:.2f}", "sacrebleu corpus BLEU on reply strings, 0-100, higher is closer to the references"),
    "chrf": ("chrF", "{:.2f}", "sacrebleu corpus chrF, 0-100"),
    "dist1": ("Dist-1", "{:.3f}", "distinct unigrams / all unigrams of the replies"),
    "dist2": ("Dist-2", "{:.3f}", "distinct bigrams / all bigrams of the replies"),
    "avg_words": ("Avg words", "{:.1f}", "mean reply length in words"),
    "reference_avg_words": ("Ref words", "{:.1f}", "mean reference length in words"),
    "perplexity": ("PPL", "{:.2f}", "perplexity of the reference replies (per token, end-of-turn included)"),
}


@dataclass(frozen=True)
class Sample:
    """One scored example, for the report: where it came from, what was asked, expected, answered."""

    where: str
    persona: str
    prompt: str
    reference: str
    prediction: str


@dataclass(frozen=True)
class EvalReport:
    bundle: str
    model: str
    test_file: str
    examples: int
    decoding: dict[str, Any]
    metrics: dict[str, float]
    consistency: dict[str, float] | None
    samples: tuple[Sample, ...]
    seconds: float

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> EvalReport:
        data = json.loads(text)
        data["samples"] = tuple(Sample(**s) for s in data.get("samples", ()))
        return cls(**data)

    def to_markdown(self) -> str:
        lines = [f"# Evaluation of {self.model}", "",
                 f"Bundle `{self.bundle}`, {self.examples} examples from `{self.test_file}`, decoding "
                 + ", ".join(f"{k} {v}" for k, v in self.decoding.items()) + f"; {self.seconds:.0f} s.", "",
                 "| Metric | Value | Meaning |", "|---|---|---|"]
        for key, (title, fmt, meaning) in METRICS.items():
            if key in self.metrics:
                lines.append(f"| {title} | {fmt.format(self.metrics[key])} | {meaning} |")
        lines += ["", "## Persona consistency", ""]
        if self.consistency is None:
            lines.append("Not run (`npctalk evaluate --with-consistency`; issue 5's `npctalk evaluate --consistency`).")
        else:
            lines += ["| Score | Value |", "|---|---|"] + [f"| {k} | {v:.3f} |" for k, v in self.consistency.items()]
        lines += ["", "## Sample replies", ""]
        for s in self.samples:
            lines += [f"- **{s.persona or 'no persona'}** ({s.where}) — player: {s.prompt}",
                      f"  - reference: {s.reference}", f"  - model: {s.prediction}"]
        return "\n".join(lines) + "\n"

    def write(self, folder: Path, stem: str = "eval") -> tuple[Path, Path]:
        """Write ``<stem>.json`` and ``<stem>.md`` into ``folder``; return both paths."""
        folder.mkdir(parents=True, exist_ok=True)
        json_path, md_path = folder / f"{stem}.json", folder / f"{stem}.md"
        json_path.write_text(self.to_json(), encoding="utf-8")
        md_path.write_text(self.to_markdown(), encoding="utf-8")
        return json_path, md_path


def comparison_table(reports: Sequence[EvalReport]) -> str:
    """Markdown table, one row per report (e.g. base model, then fine-tuned), one column per metric."""
    keys = [k for k in METRICS if any(k in r.metrics for r in reports)]
    extra = sorted({k for r in reports for k in (r.consistency or {})})
    head = ["Model", "Examples", *(METRICS[k][0] for k in keys), *(f"consistency: {k}" for k in extra)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in reports:
        cells = [f"{r.model} (`{Path(r.bundle).name}`)", str(r.examples)]
        cells += [METRICS[k][1].format(r.metrics[k]) if k in r.metrics else "—" for k in keys]
        cells += [f"{(r.consistency or {})[k]:.3f}" if k in (r.consistency or {}) else "—" for k in extra]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
