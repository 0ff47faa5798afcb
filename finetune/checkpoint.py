"""Resumable training state: ``<output>/checkpoints/step-<N>/`` holds everything a run needs to go on.

    step-<N>/
      config.json, model.safetensors   the model after optimizer step N (save_pretrained)
      optimizer.pt, scheduler.pt       AdamW moments and the learning-rate schedule position
      state.json                       TrainState below (step, best so far, evaluation history)
      rng.pt                           torch RNG states (dropout), so a resumed run matches

A checkpoint counts once ``state.json`` exists (written last); older ones beyond ``keep`` are deleted.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import FinetuneError

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
STATE_FILE = "state.json"


@dataclass
class TrainState:
    """Progress of one run. ``best_bleu``/``best_loss`` belong to ``best_step``; ``bad_evals`` counts
    evaluations since the last improvement (early stopping); ``history`` holds every evaluation."""

    step: int = 0
    total_steps: int = 0
    best_step: int | None = None
    best_bleu: float = float("-inf")
    best_loss: float = float("inf")
    bad_evals: int = 0
    stopped_early: bool = False
    history: list[dict[str, float]] = field(default_factory=list)

    def improves(self, bleu: float, loss: float, by: str = "bleu") -> bool:
        """``by`` "bleu": higher eval BLEU is better, equal BLEU (e.g. both 0 early on) broken by lower
        eval loss; "loss": lower eval loss is better, equal loss broken by higher BLEU."""
        if by == "loss":
            return (-loss, bleu) > (-self.best_loss, self.best_bleu)
        return (bleu, -loss) > (self.best_bleu, -self.best_loss)


def checkpoint_dir(output: Path, step: int) -> Path:
    return output / CHECKPOINTS / f"step-{step}"


def save_checkpoint(output: Path, model: Any, optimizer: Any, scheduler: Any, state: TrainState, keep: int) -> Path:
    """Write ``step-<state.step>`` and delete all but the ``keep`` newest checkpoints."""
    import torch

    folder = checkpoint_dir(output, state.step)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    model.save_pretrained(folder)
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    torch.save(scheduler.state_dict(), folder / "scheduler.pt")
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    torch.save(rng, folder / "rng.pt")
    (folder / STATE_FILE).write_text(json.dumps(_state_json(state), indent=2), encoding="utf-8")  # last: marks it complete
    for old in list_checkpoints(output)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    log.info("Checkpoint saved: %s", folder)
    return folder


def _state_json(state: TrainState) -> dict[str, Any]:
    data = asdict(state)
    for key in ("best_bleu", "best_loss"):  # JSON has no infinities
        if data[key] in (float("inf"), float("-inf")):
            data[key] = None
    return data


def list_checkpoints(output: Path) -> list[Path]:
    """Complete checkpoints under ``output``, oldest first."""
    root = output / CHECKPOINTS
    found = [p for p in root.glob("step-*") if (p / STATE_FILE).is_file() and p.name[5:].isdigit()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name[5:]))


def find_checkpoint(output: Path, resume: str | Path) -> Path:
    """``resume`` is ``latest`` (newest under ``output``) or a checkpoint folder; ``FinetuneError`` if none."""
    if str(resume) == "latest":
        found = list_checkpoints(output)
        if not found:
            raise FinetuneError(f"--resume latest: {output / CHECKPOINTS} holds no complete checkpoint to resume from.")
        return found[-1]
    folder = Path(resume)
    if not (folder / STATE_FILE).is_file():
        raise FinetuneError(f"{folder} is not a complete checkpoint (no {STATE_FILE}); pick one under {output / CHECKPOINTS}.")
    return folder


def load_state(folder: Path) -> TrainState:
    try:
        data = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
        data["best_bleu"] = float("-inf") if data["best_bleu"] is None else data["best_bleu"]
        data["best_loss"] = float("inf") if data["best_loss"] is None else data["best_loss"]
        return TrainState(**data)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise FinetuneError(f"{folder / STATE_FILE} is unreadable ({exc}); resume from another checkpoint.") from exc


def restore_optimizer(folder: Path, optimizer: Any, scheduler: Any) -> None:
    """Load optimizer, schedule and RNG states saved by ``save_checkpoint`` (weights are loaded separately)."""
    import torch

    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
    rng = torch.load(folder / "rng.pt", weights_only=False)
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
