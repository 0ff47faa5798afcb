"""``finetune``: a plain PyTorch loop over prompt/completion examples, loss on the NPC's reply only.

One optimizer step = ``grad_accumulation`` micro-batches of ``batch_size`` examples; the loss is the
mean over every target token of the whole step (token-weighted, not a mean of batch means). AdamW
(no decay on biases and norms), warmup then cosine decay, gradient clipping, gradient checkpointing,
bf16 autocast where the GPU supports it. Every ``eval_interval`` steps: eval loss and greedy-decoded
BLEU on the validation file; a better BLEU (ties: lower loss) saves the model into the output root,
and early stopping ends the run after ``early_stopping_patience`` evaluations without one. A
checkpoint is written at every evaluation, so ``resume="latest"`` continues from the last one with
the same data order, optimizer and schedule.

The data order of epoch ``e`` is a permutation seeded by ``(seed, e)``, so a resumed run skips
exactly the micro-batches it had already trained on.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoint import TrainState, find_checkpoint, load_state, restore_optimizer, save_checkpoint
from .config import FinetuneConfig
from .dataset import PERSONAS_FOLDER, Example, load_examples
from .errors import FinetuneError
from .metrics import corpus_bleu
from .output import BaseModel, load_base, prepare_output, read_run_info, write_card, write_run_info
from .prompts import IGNORE_INDEX, Encoded, ExampleEncoder, engine_tokenizer, training_manifest

log = logging.getLogger(__name__)

GENERATE_BATCH = 16  # validation prompts decoded together for BLEU


@dataclass(frozen=True)
class FinetuneResult:
    """Outcome of a run: ``output`` holds the best model; ``history`` every evaluation."""

    output: Path
    steps: int
    best_step: int | None
    best_bleu: float
    best_eval_loss: float
    stopped_early: bool
    history: tuple[dict[str, float], ...]


def finetune(source: str | Path, train_file: str | Path, valid_file: str | Path, output: str | Path,
             config: FinetuneConfig = FinetuneConfig(), *, resume: str | Path | None = None,
             personas_dir: str | Path | None = None, overwrite: bool = False, progress: bool = False) -> FinetuneResult:
    """Fine-tune ``source`` (folder, hub id or ``default``) on ``train_file``; write the best model to ``output``.

    ``resume``: ``"latest"`` or a checkpoint folder of an earlier run into the same ``output``.
    Raises ``DatasetError`` (file:line) for bad data (malformed lines before any model is loaded), ``FinetuneError``
    for an unusable output folder or checkpoint, ``ConfigError`` for bad settings.
    """
    import torch

    output = Path(output)
    if personas_dir is None and (Path(train_file).parent / PERSONAS_FOLDER).is_dir():
        personas_dir = Path(train_file).parent / PERSONAS_FOLDER  # the validation file may live elsewhere
    train = load_examples(train_file, personas_dir)
    valid = load_examples(valid_file, personas_dir)
    device = _device(config.device)
    autocast = _autocast_dtype(config.precision, device)
    if resume is not None:
        checkpoint = find_checkpoint(output, resume)
        base, model, hf_tok = _load_for_resume(output, checkpoint, source)
        state = load_state(checkpoint)
    else:
        prepare_output(output, overwrite)
        base, loaded = load_base(source)
        model, hf_tok, state, checkpoint = loaded.model, loaded.tokenizer, TrainState(), None
        hf_tok.save_pretrained(output)
        write_card(output, base)
    manifest = training_manifest(model.config, hf_tok, base.name, base.architecture, config.max_length)
    encoder = ExampleEncoder(manifest, engine_tokenizer(hf_tok))
    train_ids = [encoder.encode(e) for e in train]
    valid_ids = [encoder.encode(e) for e in valid]
    total = config.total_steps(len(train))
    if state.total_steps and state.total_steps != total:
        raise FinetuneError(f"The checkpoint was made for a run of {state.total_steps} steps; these settings give "
                            f"{total}. Resume with the same data and settings.")
    state.total_steps = total
    interval = config.eval_interval(total)
    log.info("Fine-tuning %s on %d examples (%d validation): %d optimizer steps, evaluation every %d, on %s%s.",
             base.name, len(train), len(valid), total, interval, device, f" with {autocast} autocast" if autocast else "")

    torch.manual_seed(config.seed)
    model.to(device)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    optimizer = _optimizer(model, config)
    scheduler = _scheduler(optimizer, config, total)
    if checkpoint is not None:
        restore_optimizer(checkpoint, optimizer, scheduler)
        log.info("Resumed from %s at step %d of %d.", checkpoint, state.step, total)
    run_info = {"base": base.__dict__ | {"license_text": None}, "config": config.to_dict(),
                "train_file": str(train_file), "valid_file": str(valid_file), "total_steps": total}
    write_run_info(output, {**run_info, "state": None})

    bar = _progress_bar(total, state.step, progress)
    per_epoch = config.steps_per_epoch(len(train))
    started, window_loss, window_steps = time.monotonic(), 0.0, 0
    while state.step < total and not state.stopped_early:
        epoch, done_in_epoch = divmod(state.step, per_epoch)
        for group in _step_groups(len(train), epoch, config)[done_in_epoch:]:
            model.train()
            loss = _train_step(model, optimizer, scheduler, group, train_ids, config, device, autocast)
            state.step += 1
            window_loss, window_steps = window_loss + loss, window_steps + 1
            bar.update(1)
            if state.step % config.log_every == 0:
                log.info("step %d/%d  loss %.4f  lr %.2e  (%.0f s)", state.step, total, window_loss / window_steps,
                         scheduler.get_last_lr()[0], time.monotonic() - started)
                window_loss, window_steps = 0.0, 0
            if state.step % interval == 0 or state.step == total:
                _evaluate_and_keep(model, encoder, valid, valid_ids, config, device, autocast, state, output)
                with _inference_config(model):
                    save_checkpoint(output, model, optimizer, scheduler, state, config.keep_checkpoints)
                write_run_info(output, {**run_info, "state": state.__dict__})
            if state.step >= total or state.stopped_early:
                break
    bar.close()
    summary = {"steps": state.step, "best_step": state.best_step, "best_eval_bleu": state.best_bleu,
               "best_eval_loss": state.best_loss, "stopped_early": state.stopped_early, "evaluations": state.history}
    write_card(output, base, summary)
    write_run_info(output, {**run_info, "state": state.__dict__})
    log.info("Done: best eval BLEU %.2f (loss %.4f) at step %s; model in %s.", state.best_bleu, state.best_loss,
             state.best_step, output)
    if hint := loss_still_falling(state, config):
        log.warning(hint)
    return FinetuneResult(output, state.step, state.best_step, state.best_bleu, state.best_loss, state.stopped_early,
                          tuple(state.history))


def _load_for_resume(output: Path, checkpoint: Path, source: str | Path) -> tuple[BaseModel, Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from npctalk.export.sources import identify

    info = read_run_info(output)
    base = BaseModel(**{**info["base"], "license_text": (output / "LICENSE").read_text(encoding="utf-8")})
    if identify(source).id != base.source:
        raise FinetuneError(f"{output} is a run fine-tuning {base.source}, not {identify(source).id}; "
                            "resume it with the same source.")
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype="float32")
    return base, model, AutoTokenizer.from_pretrained(output)


def _device(choice: str) -> str:
    import torch

    if choice == "cuda" and not torch.cuda.is_available():
        raise FinetuneError("device cuda was asked for, but torch sees no CUDA GPU; use --device cpu.")
    return choice if choice != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")


def _autocast_dtype(precision: str, device: str) -> Any:
    import torch

    if precision == "fp32" or (precision == "auto" and not (device == "cuda" and torch.cuda.is_bf16_supported())):
        return None
    return torch.bfloat16


def _optimizer(model: Any, config: FinetuneConfig) -> Any:
    import torch

    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]  # biases, norm scales
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.learning_rate)


def _scheduler(optimizer: Any, config: FinetuneConfig, total: int) -> Any:
    import torch

    warmup = math.ceil(config.warmup_ratio * total)

    def factor(step: int) -> float:  # multiplies the peak learning rate
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        if config.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 1.0 - progress) if config.schedule == "linear" else 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _step_groups(n: int, epoch: int, config: FinetuneConfig) -> list[list[list[int]]]:
    """Epoch ``epoch``'s example indices as optimizer steps → micro-batches → indices."""
    import torch

    order = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed * 100_003 + epoch)).tolist()
    micro = [order[i:i + config.batch_size] for i in range(0, n, config.batch_size)]
    return [micro[i:i + config.grad_accumulation] for i in range(0, len(micro), config.grad_accumulation)]


def _collate(batch: Sequence[Encoded], pad_id: int, device: str) -> tuple[Any, Any, Any]:
    """Right-padded (batch, seq) input ids, attention mask and labels (-100 on prompt and padding)."""
    import torch

    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, e in enumerate(batch):
        ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[row, : len(e.labels)] = torch.tensor(e.labels)
        mask[row, : len(e.input_ids)] = 1
    return ids.to(device), mask.to(device), labels.to(device)


def completion_loss_sum(model: Any, batch: Sequence[Encoded], device: str, autocast: Any) -> tuple[Any, int]:
    """Summed next-token cross-entropy over target tokens only, and how many there were."""
    import torch
    import torch.nn.functional as F

    ids, mask, labels = _collate(batch, model.config.pad_token_id or 0, device)
    with torch.autocast(device_type=device, dtype=autocast, enabled=autocast is not None):
        logits = model(input_ids=ids, attention_mask=mask).logits  # (batch, seq, vocab)
    shifted = logits[:, :-1].float().reshape(-1, logits.shape[-1])  # position t predicts token t + 1
    targets = labels[:, 1:].reshape(-1)
    loss = F.cross_entropy(shifted, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, int((targets != IGNORE_INDEX).sum())


def _train_step(model: Any, optimizer: Any, scheduler: Any, group: list[list[int]], encoded: list[Encoded],
                config: FinetuneConfig, device: str, autocast: Any) -> float:
    """One optimizer step over ``group``'s micro-batches; returns the mean target-token loss."""
    import torch

    tokens = sum(sum(1 for t in encoded[i].labels[1:] if t != IGNORE_INDEX) for micro in group for i in micro)
    total = 0.0
    for micro in group:
        loss_sum, _ = completion_loss_sum(model, [encoded[i] for i in micro], device, autocast)
        (loss_sum / tokens).backward()
        total += float(loss_sum.detach())
    if config.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return total / tokens


def eval_loss(model: Any, encoded: Sequence[Encoded], batch_size: int, device: str, autocast: Any) -> float:
    """Mean target-token cross-entropy over ``encoded`` (nats per token)."""
    import torch

    model.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(encoded), batch_size):
            loss_sum, n = completion_loss_sum(model, encoded[i:i + batch_size], device, autocast)
            total, tokens = total + float(loss_sum), tokens + n
    return total / max(tokens, 1)


def generate_replies(model: Any, encoder: ExampleEncoder, examples: Sequence[Example], max_new_tokens: int,
                     device: str) -> list[str]:
    """Greedy replies from the PyTorch model to the engine's prompts (left-padded batches)."""
    import torch

    manifest, eos = encoder.manifest, list(encoder.manifest.eos_token_ids)
    # Left padding, masked out. Not an EOS id: DialoGPT prompts end with EOS, and transformers warns
    # about "right padding" when the last prompt token equals the pad id.
    pad = manifest.pad_token_id if manifest.pad_token_id not in eos else next(i for i in range(len(eos) + 1) if i not in eos)
    replies: list[str] = []
    model.eval()
    for start in range(0, len(examples), GENERATE_BATCH):
        prompts = [encoder.prompt_ids(e, max_new_tokens) for e in examples[start:start + GENERATE_BATCH]]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=eos, pad_token_id=pad, use_cache=True)
        for row in out[:, width:].tolist():
            cut = next((i for i, t in enumerate(row) if t in eos), len(row))
            replies.append(encoder.formatter.tokenizer.decode(row[:cut]).strip())
    return replies


def _evaluate_and_keep(model: Any, encoder: ExampleEncoder, valid: list[Example], valid_ids: list[Encoded],
                       config: FinetuneConfig, device: str, autocast: Any, state: TrainState, output: Path) -> None:
    """Eval loss + BLEU; save the model to ``output`` if it is the best so far; update early stopping."""
    loss = eval_loss(model, valid_ids, config.batch_size, device, autocast)
    subset = valid[: config.eval_examples] if config.eval_examples else valid
    replies = generate_replies(model, encoder, subset, config.eval_max_new_tokens, device)
    bleu = corpus_bleu(replies, [[e.completion] for e in subset])
    state.history.append({"step": state.step, "eval_loss": loss, "eval_bleu": bleu})
    if state.improves(bleu, loss, config.select_by):
        state.best_step, state.best_bleu, state.best_loss, state.bad_evals = state.step, bleu, loss, 0
        with _inference_config(model):
            model.save_pretrained(output)
        verdict = "best so far, saved"
    else:
        state.bad_evals += 1
        verdict = f"no improvement ({state.bad_evals}/{config.early_stopping_patience or '∞'})"
        if config.early_stopping_patience and state.bad_evals >= config.early_stopping_patience:
            state.stopped_early = True
            verdict += "; stopping early"
    log.info("eval at step %d: loss %.4f  BLEU %.2f  — %s", state.step, loss, bleu, verdict)


def loss_still_falling(state: TrainState, config: FinetuneConfig) -> str | None:
    """A hint when BLEU stopped the run early while the eval loss still fell: on a small validation set
    BLEU moves by chance from one evaluation to the next (the H100 run of the recipe stopped at step
    24 of 80 with the loss lower at every evaluation)."""
    if not state.stopped_early or config.select_by != "bleu" or len(state.history) < 2:
        return None
    last = state.history[-1]
    if last["eval_loss"] >= state.best_loss:
        return None
    return (f"Stopped early by eval BLEU at step {state.step} of {state.total_steps} while the eval loss still fell "
            f"({state.best_loss:.4f} at the kept step {state.best_step}, {last['eval_loss']:.4f} at step "
            f"{last['step']}). On a small validation set BLEU moves by chance: --select-by loss keeps the lowest eval "
            "loss, --patience 0 runs every step.")


@contextmanager
def _inference_config(model: Any) -> Iterator[None]:
    """Saved configs have ``use_cache`` on, as an inference model (export) expects; training keeps it off."""
    model.config.use_cache = True
    try:
        yield
    finally:
        model.config.use_cache = False


def _progress_bar(total: int, initial: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", desc="fine-tuning")
