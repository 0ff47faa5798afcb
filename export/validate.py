"""Step 3 of export: check the ONNX graph against the PyTorch model it came from.

Two checks, both recorded in ``validation.json``:

1. **Parity**: a fixed prompt runs through both as prefill (past length 0), then ``DECODE_STEPS``
   cached decode steps, each fed PyTorch's greedy token. Per step the largest absolute difference
   of ``logits`` (batch, seq, vocab) — or (batch, 1, vocab) for graphs that return the last position
   only (the lean graph; the runtime samples from the last position) — and of every ``present.*``
   (batch, kv_heads, past+seq, head_dim) is compared with the limit ``atol + rtol * max|PyTorch value|`` (the rtol term scales the limit
   with the model's logit range, so one default fits a 2-layer toy and a 30-layer model). An explicit
   ``atol`` (``--atol``) replaces the whole limit with that absolute number. Top-1 agreement (same
   argmax of the last position's logits) is reported per step; for int8 it is the useful measure.
2. **Left padding** (mask layout): a left-padded batch of two must give the same logits for its real tokens as
   the shorter prompt alone (prefill and 2 decode steps), and the same ``present.*`` at its real
   positions (so padding leaking into any position's keys/values is caught even when the graph
   returns last-position logits only), so the runtime can batch NPC streams.
   Skipped, and reported so, when the graph has no ``attention_mask``/``position_ids`` input.

Default tolerances (``TOLERANCES``) and what they were set against, SmolLM2-135M-Instruct on an
x86 CPU (max|logit| ≈ 29, so the fp32 limit is ≈ 3e-3):

    dtype  limit                     measured max|diff| (parity / left padding)
    fp32   1e-4 + 1e-4 × max|ref|    6.4e-5 / 5.0e-5     kernel order only
    fp16   1e-2 + 1e-2 × max|ref|    5.1e-2 / 9.5e-3     every activation rounded to 11 bits
    int8   1.0  + 0.3  × max|ref|    5.1    / 5.9       top-1 agreement 89%
    int4   1.0  + 0.6  × max|ref|    11.1   / 0.9       top-1 agreement 100%  (perplexity +11%, bench/quality.py)

int8 is genuinely that far off: dynamic quantization gives each activation tensor one uint8 scale,
and small models have outlier activations. Its limit only catches a broken graph (a wrong graph is
off by the whole logit range); judge int8 quality by ``top1_agreement`` in the report.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from npctalk.engine.errors import ExportError, ValidationError

log = logging.getLogger(__name__)

DECODE_STEPS = 8
PADDING_DECODE_STEPS = 2
PROMPT = "Hello traveller! What brings you to the village of Ashford today? The blacksmith is busy."
VALIDATION_FILE = "validation.json"


@dataclass(frozen=True)
class Tolerance:
    """Allowed max abs difference: ``atol + rtol * max|reference|`` (units of the compared tensor)."""

    atol: float
    rtol: float = 0.0

    def limit(self, scale: float) -> float:
        return self.atol + self.rtol * scale


TOLERANCES = {
    "fp32": Tolerance(atol=1e-4, rtol=1e-4),
    "fp16": Tolerance(atol=1e-2, rtol=1e-2),
    "int8": Tolerance(atol=1.0, rtol=0.3),
    # int4: like int8, only catches a broken graph (one off by the whole logit range); quality is perplexity
    # (bench/quality.py). The tests' 2-layer random Llama (weights ~N(0, 0.2)) measures 3.6 at max|ref| 7.
    "int4": Tolerance(atol=1.0, rtol=0.6),
}


def tolerance_for(dtype: str, atol: float | None = None) -> Tolerance:
    """The dtype's default tolerance, or exactly ``atol`` when one is given."""
    if atol is not None:
        if atol < 0:
            raise ExportError(f"--atol must be >= 0, got {atol}.")
        return Tolerance(atol=atol, rtol=0.0)
    return TOLERANCES[dtype]


def cuda_usable() -> bool:
    """Whether onnxruntime can run a graph on CUDA here (probes a one-node graph; about 1 s)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 17)])  # onnx 1.23 writes 14
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(model.SerializeToString(), options,
                                       providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own error types; any failure here means "not usable"
        log.debug("CUDA probe failed: %s", exc)
        return False
    return "CUDAExecutionProvider" in session.get_providers()


class OnnxDecoder:
    """One ONNX Runtime session over a bundle graph; ``step`` runs it once. Not thread-safe."""

    def __init__(self, model_path: Path, io: dict[str, Any], num_layers: int, device: str = "cpu") -> None:
        import onnxruntime as ort

        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
        options = ort.SessionOptions()
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(model_path), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise ValidationError(f"onnxruntime cannot load the exported graph: {exc}") from exc
        if device == "cuda" and "CUDAExecutionProvider" not in self.session.get_providers():
            raise ExportError("--device cuda was asked for, but onnxruntime cannot use CUDA on this machine "
                              "(no NVIDIA GPU or CUDA libraries); validate with --device cpu.")
        self.provider = self.session.get_providers()[0]
        declared = {i.name for i in self.session.get_inputs()}  # optional roles the graph lacks are fed nothing
        optional = ("attention_mask", "position_ids", "seqlens_k", "total_sequence_length")
        self.io = {**io, **{role: None for role in optional if io.get(role) not in declared}}
        self.num_layers = num_layers
        self.past_names = [io[f"past_{kv}"].format(layer=i) for i in range(num_layers) for kv in ("key", "value")]
        self.present_names = [io[f"present_{kv}"].format(layer=i) for i in range(num_layers) for kv in ("key", "value")]
        first = next(i for i in self.session.get_inputs() if i.name == self.past_names[0])
        self.kv_shape = (int(first.shape[1]), int(first.shape[3]))  # (kv_heads, head_dim)
        self.kv_dtype = np.float16 if first.type == "tensor(float16)" else np.float32
        logits = next(o for o in self.session.get_outputs() if o.name == io["logits"])
        # A graph whose logits' sequence axis is the constant 1 returns the last position only.
        self.last_only = len(logits.shape) == 3 and logits.shape[1] == 1

    def empty_past(self, batch: int) -> list[np.ndarray]:
        """Past of length 0: (batch, kv_heads, 0, head_dim) for each key and value."""
        return [np.zeros((batch, self.kv_shape[0], 0, self.kv_shape[1]), self.kv_dtype) for _ in self.past_names]

    def step(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray,
             past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """ids/positions (batch, seq), mask (batch, past+seq) → logits float32 (batch, seq or 1, vocab), present.

        Raises ``ValidationError`` when the logits do not have the sequence length the graph declares.
        """
        feed: dict[str, np.ndarray] = {self.io["input_ids"]: ids.astype(np.int64)}
        if self.io.get("attention_mask"):
            feed[self.io["attention_mask"]] = mask.astype(np.int64)
        if self.io.get("position_ids"):
            feed[self.io["position_ids"]] = positions.astype(np.int64)
        if self.io.get("seqlens_k"):  # slots layout: lengths instead of a mask, so rows are never padded
            if not mask.all():
                raise ValidationError("A slots-layout graph (no attention_mask) cannot take a padded batch.")
            feed[self.io["seqlens_k"]] = np.full(ids.shape[0], mask.shape[1] - 1, np.int32)
            feed[self.io["total_sequence_length"]] = np.array(mask.shape[1], np.int32)
        feed.update(zip(self.past_names, past, strict=True))
        out = self.session.run([self.io["logits"], *self.present_names], feed)
        want = 1 if self.last_only else ids.shape[1]
        if out[0].ndim != 3 or out[0].shape[:2] != (ids.shape[0], want):
            raise ValidationError(f"ONNX output 'logits' has shape {out[0].shape}; expected ({ids.shape[0]}, {want}, vocab) "
                                  f"for input_ids of shape {ids.shape}.")
        return out[0].astype(np.float32), out[1:]


def _max_diff(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(max |a - b|, max |b|) in float64."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return float(np.max(np.abs(a64 - b64))), float(np.max(np.abs(b64)))


def _torch_present(cache: Any, num_layers: int) -> list[np.ndarray]:
    out = []
    for i in range(num_layers):
        layer = cache.layers[i] if hasattr(cache, "layers") else None
        key, value = (layer.keys, layer.values) if layer is not None else cache[i]
        out += [key.float().numpy(), value.float().numpy()]
    return out


def check_parity(decoder: OnnxDecoder, model: Any, prompt_ids: list[int], tol: Tolerance) -> list[dict[str, Any]]:
    """Prefill + ``DECODE_STEPS`` cached steps in ONNX and PyTorch; one record per step (see module doc)."""
    import torch

    ids = np.asarray([prompt_ids], dtype=np.int64)                # (1, seq)
    past, cache, steps = decoder.empty_past(1), None, []
    total = 0
    for step in range(DECODE_STEPS + 1):
        seq = ids.shape[1]
        mask = np.ones((1, total + seq), np.int64)                  # (1, past + seq)
        positions = np.arange(total, total + seq)[None]            # (1, seq)
        with torch.no_grad():
            ref = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                        position_ids=torch.from_numpy(positions), past_key_values=cache, use_cache=True)
        cache = ref.past_key_values
        ref_logits = ref.logits.float().numpy()                    # (1, seq, vocab)
        logits, past = decoder.step(ids, mask, positions, past)    # (1, seq or 1, vocab)
        diff, scale = _max_diff(logits, ref_logits[:, -logits.shape[1]:])
        record: dict[str, Any] = {
            "step": "prefill" if step == 0 else f"decode {step}", "tokens": seq,
            "logits_max_abs_diff": diff, "logits_limit": tol.limit(scale),
            "top1_match": bool(logits[0, -1].argmax() == ref_logits[0, -1].argmax()),
        }
        worst = ("", 0.0, 0.0)
        for name, got, want in zip(decoder.present_names, past, _torch_present(cache, decoder.num_layers), strict=True):
            d, s = _max_diff(got, want)
            if d - tol.limit(s) > worst[1] - worst[2] or not worst[0]:
                worst = (name, d, tol.limit(s))
        record.update(present_worst=worst[0], present_max_abs_diff=worst[1], present_limit=worst[2])
        steps.append(record)
        total += seq
        ids = ref_logits[:, -1:].argmax(-1).astype(np.int64)       # (1, 1) PyTorch's greedy token
    return steps


def check_left_padding(decoder: OnnxDecoder, prompt_ids: list[int], pad_id: int, tol: Tolerance) -> dict[str, Any]:
    """A left-padded batch of 2 vs the shorter prompt alone; max logit difference on its real tokens."""
    if decoder.io.get("seqlens_k"):
        return {"supported": False, "reason": "slots layout: streams are never padded, each keeps its own KV slot "
                                              "(engine/slots.py; its tests compare batched slots with single streams)"}
    if not (decoder.io.get("attention_mask") and decoder.io.get("position_ids")):
        return {"supported": False, "reason": "the graph has no attention_mask/position_ids input"}
    short, full = prompt_ids[: max(2, len(prompt_ids) - 3)], prompt_ids
    pad = len(full) - len(short)
    # Single stream: the short prompt, unpadded.
    ids1 = np.asarray([short], np.int64)
    mask1, pos1 = np.ones_like(ids1), np.arange(len(short))[None]
    # Batch: row 0 = pads + short prompt, row 1 = the full prompt; HF's position_ids for padding.
    ids2 = np.asarray([[pad_id] * pad + short, full], np.int64)
    mask2 = np.asarray([[0] * pad + [1] * len(short), [1] * len(full)], np.int64)
    pos2 = np.where(mask2 == 1, np.cumsum(mask2, axis=1) - 1, 1)
    past1, past2 = decoder.empty_past(1), decoder.empty_past(2)
    worst, limit = 0.0, float("inf")
    kv_worst, kv_limit = -float("inf"), 0.0
    for step in range(PADDING_DECODE_STEPS + 1):
        out1, past1 = decoder.step(ids1, mask1, pos1, past1)
        out2, past2 = decoder.step(ids2, mask2, pos2, past2)
        real = out2[0, pad:] if step == 0 and not decoder.last_only else out2[0]  # (seq or 1, vocab), row 0's real tokens
        diff, scale = _max_diff(real, out1[0])
        worst, limit = max(worst, diff), min(limit, tol.limit(scale))
        for got, want in zip(past2, past1, strict=True):           # (kv_heads, pad + n, head_dim) vs (kv_heads, n, head_dim)
            diff, scale = _max_diff(got[0, :, pad:], want[0])
            if diff - tol.limit(scale) > kv_worst - kv_limit:      # each tensor against its own limit; keep the worst
                kv_worst, kv_limit = diff, tol.limit(scale)
        token = out1[:, -1:].argmax(-1).astype(np.int64)           # (1, 1)
        ids1, ids2 = token, np.concatenate([token, token])
        mask1 = np.concatenate([mask1, np.ones((1, 1), np.int64)], axis=1)
        mask2 = np.concatenate([mask2, np.ones((2, 1), np.int64)], axis=1)
        pos1, pos2 = pos1[:, -1:] + 1, pos2[:, -1:] + 1
    return {"supported": True, "pad_tokens": pad, "steps": PADDING_DECODE_STEPS + 1,
            "max_abs_diff": worst, "limit": limit, "present_max_abs_diff": kv_worst, "present_limit": kv_limit}


def validate(decoder: OnnxDecoder, model: Any, prompt_ids: list[int], pad_id: int, dtype: str,
             atol: float | None = None) -> dict[str, Any]:
    """Run both checks; return the report, or raise ``ValidationError`` naming output, step and size."""
    if len(prompt_ids) < 4:
        raise ExportError(f"The validation prompt tokenized to {len(prompt_ids)} tokens; need at least 4.")
    tol = tolerance_for(dtype, atol)
    steps = check_parity(decoder, model, prompt_ids, tol)
    padding = check_left_padding(decoder, prompt_ids, pad_id, tol)
    agree = sum(s["top1_match"] for s in steps) / len(steps)
    report = {
        "dtype": dtype, "provider": decoder.provider, "prompt": PROMPT, "prompt_tokens": len(prompt_ids),
        "logits_compared": "last position" if decoder.last_only else "every position",
        "tolerance": {**asdict(tol), "explicit_atol": atol is not None},
        "steps": steps, "top1_agreement": agree, "left_padding": padding,
    }
    for s in steps:
        log.info("  %-9s logits max|diff| %.2e (limit %.2e)  present max|diff| %.2e  top-1 %s", s["step"],
                 s["logits_max_abs_diff"], s["logits_limit"], s["present_max_abs_diff"],
                 "same" if s["top1_match"] else "DIFFERENT")
    if padding["supported"]:
        log.info("  left-padded batch vs single stream: max|diff| %.2e (limit %.2e), present %.2e (limit %.2e)",
                 padding["max_abs_diff"], padding["limit"], padding["present_max_abs_diff"], padding["present_limit"])
    failures = []  # (step, output, diff, limit) in step order, logits before the cache
    for s in steps:
        failures += [(s["step"], out, d, lim) for out, d, lim in (
            ("logits", s["logits_max_abs_diff"], s["logits_limit"]),
            (s["present_worst"], s["present_max_abs_diff"], s["present_limit"])) if not d <= lim]
    if padding["supported"] and not padding["max_abs_diff"] <= padding["limit"]:
        failures.append(("left-padded batch", "logits", padding["max_abs_diff"], padding["limit"]))
    if padding["supported"] and not padding["present_max_abs_diff"] <= padding["present_limit"]:
        failures.append(("left-padded batch", "present.*", padding["present_max_abs_diff"], padding["present_limit"]))
    report["passed"] = not failures
    if failures:
        step, output, diff, limit = failures[0]
        how = f"--atol {atol}" if atol is not None else f"{dtype} default atol {tol.atol} + rtol {tol.rtol} x max|value|"
        more = "".join(f"; also {o!r} at {st} ({d:.4g} > {lim:.4g})" for st, o, d, lim in failures[1:3])
        raise ValidationError(
            f"ONNX output {output!r} differs from PyTorch at {step}: max |diff| {diff:.4g} > limit {limit:.4g} ({how})"
            f"{more}; {len(failures)} check(s) failed in all, top-1 agreement {agree:.0%}. The graph was not kept."
        )
    if agree < 1:
        log.warning("Top-1 agreement with PyTorch is %.0f%% (%s); greedy replies may differ.", agree * 100, dtype)
    return report


def write_report(report: dict[str, Any], folder: Path) -> Path:
    """Write ``validation.json`` into ``folder``."""
    path = folder / VALIDATION_FILE
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return path
