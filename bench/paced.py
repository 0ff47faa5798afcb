"""Serve on the CPU with the slot decoder's runs paced to a GPU's measured times.

    python bench/paced.py [--step-ms 1:1.27 16:1.43 64:2.23] [--prefill-ms 2.5] [--report FILE] -- serve ...
    python bench/paced.py --from-decode results/decode-<gpu>-<date>.json --model-name dialogpt-medium -- serve ...

What a server on the GPU machine can reach depends on the model's step time, on what the engine does
on the host around it (scheduler, sampling, detokenizing, sockets) and on how much of that overlaps
the step. Device time is scarce; host behaviour is not. This runs ``npctalk serve`` (everything after
``--``) on a slots bundle whose decoder never runs its model; instead each run takes the GPU's time:

- a decode step of ``rows`` rows (the slot decoder's power-of-two row count) takes the ``--step-ms``
  table's time, interpolated linearly between its points;
- a prompt read (``prefill``, or one batch of ``prefill_many``) takes ``--prefill-ms``, or
  ``--prefill-ms-per-token`` × its tokens when that is longer.

Outputs come from a fixed rule (each row's next token from its last token and position, never an
end-of-sequence token; logits peaked at that token over a fixed random row), so replies run to their
length, and the decoder's bookkeeping (lengths, slots, snapshots) runs as usual. The model costs the
host no CPU, as beside a GPU. The server takes a CUDA bundle's settings (``server.slot_settings``:
a prompt budget of ``CUDA_PREFILL_CHUNK`` tokens a step unless ``--prefill-chunk`` says otherwise,
and the read policy ``read_policy.time_reads`` picks, timing these paced reads). The waits sleep,
releasing the GIL as ONNX Runtime does while it waits for the GPU, so host work that would overlap a
run on the GPU overlaps it here. Runs hold one lock from start to end: the GPU runs one session's
work on one stream, so two runs never overlap (``serve --decode-ahead`` runs steps on a worker thread).

Defaults are run 2's H100 figures for DialoGPT-medium, fp16 slots bundle with the CUDA graph
(``results/decode-nvidia-h100-80gb-hbm3-*-dialogpt-medium-run2``): 787.9 / 11,193 / 28,677 decode tok/s
at 1 / 16 / 64 streams are 1.27 / 1.43 / 2.23 ms a step, and a 64- or 256-token prompt took 2.5-2.9 ms to
its first token. The per-token prefill default (0.0018 ms) is not measured: it is medium's 2 × 355 M
flops a token at 400 TFLOP/s, which only decides reads of many prompts together.

``--report`` writes, when the server exits, how many runs of each kind there were, the time they were
paced to, the wall time they took and how many ran over their target (none should: nothing runs).
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import json
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# H100 run 2, DialoGPT-medium fp16 slots with the CUDA graph: rows -> ms per decode step.
DEFAULT_STEPS = ((1, 1.27), (16, 1.43), (64, 2.23))
DEFAULT_PREFILL_MS = 2.5
DEFAULT_PREFILL_MS_PER_TOKEN = 0.0018
DEFAULT_TOPK_MS = 0.05  # a step's TopK over (rows, vocab) logits on the GPU: assumed, not measured


@dataclass
class Pace:
    """Target times: ``steps`` (rows, ms) points of a decode step, sorted by rows; a prompt read
    takes ``max(prefill_ms, prefill_ms_per_token * tokens)``."""

    steps: tuple[tuple[int, float], ...] = DEFAULT_STEPS
    prefill_ms: float = DEFAULT_PREFILL_MS
    prefill_ms_per_token: float = DEFAULT_PREFILL_MS_PER_TOKEN
    topk_ms: float = DEFAULT_TOPK_MS
    counts: dict[str, dict[str, float]] = field(default_factory=dict)
    wide: dict[int, tuple[Any, Synthetic]] = field(default_factory=dict)  # id(step logits) → (binding, rule): big vocabularies
    device: threading.Lock = field(default_factory=threading.Lock)  # one run at a time, as on one CUDA stream

    def step_ms(self, rows: int) -> float:
        """The decode step's time at ``rows`` rows: linear between the table's points, flat beyond them."""
        points = sorted(self.steps)
        if rows <= points[0][0]:
            return points[0][1]
        for (r0, t0), (r1, t1) in zip(points, points[1:]):
            if rows <= r1:
                return t0 + (t1 - t0) * (rows - r0) / (r1 - r0)
        return points[-1][1]

    def read_ms(self, tokens: int) -> float:
        return max(self.prefill_ms, self.prefill_ms_per_token * tokens)

    def hold(self, kind: str, target_ms: float, run: Callable[[], Any]) -> Any:
        """``run()``, then sleep until ``target_ms`` has passed since it began; counted under ``kind``."""
        with self.device:
            start = time.perf_counter()
            out = run()
            ran = time.perf_counter() - start
            if ran * 1000 < target_ms:
                time.sleep(target_ms / 1000 - ran)
            wall = time.perf_counter() - start
        count = self.counts.setdefault(kind, {"runs": 0, "target_ms": 0.0, "wall_ms": 0.0, "over_target": 0})
        count["runs"] += 1
        count["target_ms"] += target_ms
        count["wall_ms"] += wall * 1000
        count["over_target"] += ran * 1000 > target_ms
        return out

    def summary(self) -> dict[str, Any]:
        return {"steps": [list(p) for p in self.steps], "prefill_ms": self.prefill_ms,
                "prefill_ms_per_token": self.prefill_ms_per_token, "topk_ms": self.topk_ms,
                "runs": {k: {**v, "target_ms": round(v["target_ms"], 1), "wall_ms": round(v["wall_ms"], 1)}
                         for k, v in self.counts.items()}}


class Synthetic:
    """Outputs by rule for one decoder: next tokens from (token, position) among the ids its tokenizer
    knows, never an end-of-sequence token; logits rows peaked at them over a fixed random row (every
    other id far below); each row's top candidates as a GPU's TopK would find them in those rows."""

    def __init__(self, decoder: Any) -> None:
        import numpy as np

        vocab = decoder.manifest.vocab_size
        banned = set(decoder.manifest.eos_token_ids)
        known = min(vocab, decoder.tokenizer.vocab_size)
        self.tokens = np.array([t for t in range(known) if t not in banned], dtype=np.int64)
        self.base = np.full(vocab, -20.0, dtype=np.float32)                                  # (vocab,)
        self.base[self.tokens] = np.random.default_rng(0).normal(0.0, 1.0, len(self.tokens))
        self.order = self.tokens[np.argsort(-self.base[self.tokens], kind="stable")]         # best first

    def pick(self, ids: Any, positions: Any) -> Any:
        """(rows,) next tokens for (rows,) input tokens at (rows,) positions."""
        return self.tokens[(ids * 31 + positions * 7) % len(self.tokens)]

    def top(self, picked: Any, k: int) -> tuple[Any, Any]:
        """(rows, k) candidate ids and values of ``logits(picked)``'s rows, best first: each row's
        picked token, then the fixed row's best others."""
        import numpy as np

        head = self.order[:k]                                                                # (k,)
        picked = np.asarray(picked, dtype=np.int64).reshape(-1)                              # (rows,)
        hits = head[None, :] == picked[:, None]                                              # (rows, k)
        at = np.where(hits.any(axis=1), hits.argmax(axis=1), k)                              # picked's place, else k
        rest = np.arange(k - 1)[None, :]
        ids = np.concatenate([picked[:, None], head[rest + (rest >= at[:, None])]], axis=1)  # (rows, k)
        values = self.base[ids]
        values[:, 0] += 8.0
        return ids, values

    def logits(self, picked: Any) -> Any:
        """(rows, 1, vocab) float32 logits whose argmax is ``picked``."""
        import numpy as np

        rows = np.broadcast_to(self.base, (len(picked), len(self.base))).copy()
        rows[np.arange(len(picked)), picked] += 8.0
        return rows.reshape(len(picked), 1, -1)


class SyntheticSteps:
    """Stands in for a slot decoder's session: a run of one of its step bindings writes its outputs by
    rule; no other run reaches it (prompt reads are replaced before they would)."""

    def __init__(self, session: Any, decoder: Any, pace: Pace) -> None:
        from npctalk.engine.topk import MIN_VOCAB

        self._session, self._decoder, self.rule, self._pace = session, decoder, Synthetic(decoder), pace
        self.wide = decoder.manifest.vocab_size > MIN_VOCAB  # sampled rows take top candidates, not rows

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)

    def run_with_iobinding(self, binding: Any, run_options: Any = None) -> None:
        made = next((m for m in self._decoder._steps.values() if m.binding is binding), None)
        if made is None:
            raise RuntimeError("paced: a run that is neither a decode step nor a prompt read reached the model")
        ids, positions = made.ids.numpy().reshape(-1), made.positions.numpy().reshape(-1)   # (rows,)
        picked = self.rule.pick(ids, positions)                                              # (rows,)
        made.next.update_inplace(picked.reshape(-1, 1, 1))
        if self.wide:  # (rows, vocab) of floats would cost the host what the GPU's TopK spares it
            self._pace.wide[id(made.logits)] = (made, self.rule)
        else:
            made.logits.update_inplace(self.rule.logits(picked))


def install(pace: Pace) -> Callable[[], None]:
    """Pace every ``SlotDecoder`` made in this process from now on: decode steps and prompt reads
    by rule (``SyntheticSteps``, ``Synthetic``), each held to its target time; the server's slot
    settings are a CUDA server's. Returns the function that puts everything back."""
    import numpy as np
    import onnxruntime as ort

    from npctalk.engine import server, slots, topk
    from npctalk.engine.scheduler_config import DEFAULT_PREFILL_CHUNK

    decoder = slots.SlotDecoder
    session, step, prefill, prefill_run = decoder._session, decoder._step, decoder.prefill, decoder._prefill_run

    def synthetic_session(self: Any, *args: Any, **kwargs: Any) -> Any:
        return SyntheticSteps(session(self, *args, **kwargs), self, pace)

    top_of_value, row_of_value = topk.TopK.of_value, topk.TopK.row_of_value

    def paced_top(self: Any, logits: Any, vocab: int, bonus: Any = None) -> Any:
        """A step's top candidates by rule, in the GPU's TopK time (a big vocabulary's step leaves no logits)."""
        found = pace.wide.get(id(logits))
        if found is None or found[0].logits is not logits:
            return top_of_value(self, logits, vocab, bonus)
        made, rule = found
        return pace.hold("topk", pace.topk_ms, lambda: rule.top(made.next.numpy().reshape(-1), self.k))

    def paced_row(self: Any, logits: Any, index: int, vocab: int) -> Any:
        found = pace.wide.get(id(logits))
        if found is None or found[0].logits is not logits:
            return row_of_value(self, logits, index, vocab)
        made, rule = found
        return rule.logits(made.next.numpy().reshape(-1)[index:index + 1]).reshape(1, vocab)

    topk.TopK.of_value, topk.TopK.row_of_value = paced_top, paced_row  # type: ignore[method-assign]

    def paced_step(self: Any, ids: Any, mask: Any) -> Any:
        rows = min(self.slots, 1 << int(mask.nonzero()[0][-1]).bit_length())  # as _step counts them
        return pace.hold(f"step-{rows}", pace.step_ms(rows), lambda: step(self, ids, mask))

    def read(self: Any, slot: int, ids: Any) -> int:
        """``SlotDecoder.prefill``'s checks and bookkeeping; its outputs by rule."""
        self._check_slot(slot)
        past = int(self.lengths[slot])
        tokens = self._checked_prompt(slot, ids, past)                                       # (n,)
        rule = self.session.rule
        picked = rule.pick(tokens[-1:], np.array([past + len(tokens) - 1]))                  # (1,)
        self._last_logits = ort.OrtValue.ortvalue_from_numpy(rule.logits(picked))           # (1, 1, vocab)
        self.lengths[slot] = past + len(tokens)
        return int(picked[0])

    def paced_prefill(self: Any, slot: int, ids: Any) -> int:
        return pace.hold("prefill", pace.read_ms(len(ids)), lambda: read(self, slot, ids))

    def paced_prefill_run(self: Any, run_slots: list[int], bodies: list[Any]) -> None:
        if not any(len(b) for b in bodies):
            return  # one-token prompts: the step feeds them (as ``_prefill_run``)

        def run() -> None:  # ``_prefill_run``'s bookkeeping: each slot holds its body
            for slot, body in zip(run_slots, bodies):
                self.lengths[slot] = len(body)

        pace.hold("prefill-many", pace.read_ms(sum(len(b) for b in bodies)), run)

    decoder._session = synthetic_session  # type: ignore[method-assign]
    decoder._step, decoder.prefill, decoder._prefill_run = paced_step, paced_prefill, paced_prefill_run  # type: ignore[method-assign]
    settings = getattr(server, "slot_settings", None)
    load_model = server.load_model

    def settings_on_gpu(model: Any, config: Any, *, on_gpu: bool) -> Any:
        """The server's settings as for a CUDA bundle: its prompt budget, and the timed read policy."""
        return settings(model, config, on_gpu=True)  # type: ignore[misc]

    def load_on_gpu(*args: Any, **kwargs: Any) -> Any:
        """An engine older than ``slot_settings`` (a checkout compared through the shim): its CUDA
        prompt budget, which was all it set for a GPU."""
        model, config = load_model(*args, **kwargs)
        if config.scheduler.prefill_chunk == DEFAULT_PREFILL_CHUNK:
            config = dataclasses.replace(config, scheduler=dataclasses.replace(
                config.scheduler, prefill_chunk=server.CUDA_PREFILL_CHUNK))
        return model, config

    if settings is not None:
        server.slot_settings = settings_on_gpu
    else:
        server.load_model = load_on_gpu

    def restore() -> None:
        decoder._session, decoder._step, decoder.prefill, decoder._prefill_run = session, step, prefill, prefill_run  # type: ignore[method-assign]
        if settings is not None:
            server.slot_settings = settings
        server.load_model = load_model
        topk.TopK.of_value, topk.TopK.row_of_value = top_of_value, row_of_value  # type: ignore[method-assign]

    return restore


def from_decode(path: Path, model: str) -> tuple[tuple[tuple[int, float], ...], float]:
    """The step table and the prompt read time of ``model``'s slot decoder (CUDA graph) in a
    ``bench/decode.py`` results file: each stream count's ms a step (streams ÷ decode tok/s), and the
    batch-1 time to first token of its 256-token prompt (else of its 64-token one)."""
    rows = [r for r in json.loads(path.read_text(encoding="utf-8"))["rows"]
            if r.get("model") == model and r.get("engine") == "npctalk-slots" and r.get("decode_tok_s")]
    if not rows:
        raise ValueError(f"{path} holds no npctalk-slots decode row for {model!r}")
    steps = tuple(sorted((int(r["streams"]), round(r["streams"] / r["decode_tok_s"] * 1000, 3)) for r in rows))
    first = min(rows, key=lambda r: r["streams"])
    return steps, float(first.get("ttft_long_ms") or first["ttft_ms"])


def parse_steps(items: list[str]) -> tuple[tuple[int, float], ...]:
    """``ROWS:MS`` items → sorted (rows, ms) points."""
    points = []
    for item in items:
        rows, _, ms = item.partition(":")
        try:
            points.append((int(rows), float(ms)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"--step-ms takes ROWS:MS items, got {item!r}") from None
        if points[-1][0] < 1 or points[-1][1] <= 0:
            raise argparse.ArgumentTypeError(f"--step-ms wants rows >= 1 and ms > 0, got {item!r}")
    return tuple(sorted(points))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, rest = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--step-ms", nargs="+", default=[f"{r}:{ms}" for r, ms in DEFAULT_STEPS],
                        help="ROWS:MS points of a decode step's time (default: H100, DialoGPT-medium fp16)")
    parser.add_argument("--prefill-ms", type=float, default=DEFAULT_PREFILL_MS)
    parser.add_argument("--from-decode", type=Path, default=None, metavar="RESULTS_JSON",
                        help="take the step table and prompt read time from a bench/decode.py results file "
                             "(its npctalk-slots rows of --model-name), instead of --step-ms and --prefill-ms")
    parser.add_argument("--model-name", default="dialogpt-medium", help="the architecture's rows in --from-decode")
    parser.add_argument("--prefill-ms-per-token", type=float, default=DEFAULT_PREFILL_MS_PER_TOKEN)
    parser.add_argument("--topk-ms", type=float, default=DEFAULT_TOPK_MS,
                        help="a sampled step's TopK on the GPU (big vocabularies; assumed, not measured)")
    parser.add_argument("--report", type=Path, default=None, help="write the run counts here when the server exits")
    args = parser.parse_args(ours)
    try:
        steps, prefill_ms = parse_steps(args.step_ms), args.prefill_ms
        if args.from_decode is not None:
            steps, prefill_ms = from_decode(args.from_decode, args.model_name)
    except (argparse.ArgumentTypeError, ValueError, OSError, KeyError) as exc:
        parser.error(str(exc))
    pace = Pace(steps, prefill_ms, args.prefill_ms_per_token, args.topk_ms)
    install(pace)
    if args.report is not None:
        atexit.register(lambda: args.report.write_text(json.dumps(pace.summary(), indent=2) + "\n", encoding="utf-8"))
    from npctalk.engine.cli import main as cli_main

    return cli_main(rest)


if __name__ == "__main__":
    sys.exit(main())
