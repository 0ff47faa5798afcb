"""Bring a fine-tuned model back from the GPU machine as a small delta against its base.

The lent GPU machine returns at most 64 MiB a call, and a fine-tuned SmolLM2-135M is 540 MB of fp32.
Its weights differ from the base's by a few 1e-4 after a short fine-tune, so the difference, quantized
per row to int8 (error at most the row's largest change / 254) and deflated, is about 120 MiB in
15 MiB pieces; the base is rebuilt here from the same source.

    # on the GPU machine (the fine-tune's run folder; the base as `npctalk finetune` loaded it)
    python3 bench/finetune_delta.py pack RUN_FOLDER --source default --out /tmp/delta
    # here, with every piece, index.json, check.npz and run.tgz gathered in one folder
    python3 bench/finetune_delta.py unpack PIECES_FOLDER --source default -o runs/smollm2-npc

`pack` also stores the fine-tuned model's fp32 logits on a fixed prompt (check.npz, beside each row's
int8 scale) and the run's small files (config, finetune.json, tokenizer files under 8 MiB) in run.tgz.
`unpack` rebuilds the model, writes the tokenizer and model card as `npctalk finetune` does, lays the
run's files over them (loose files beside the pieces count too), compares the logits with the GPU
machine's and refuses to save when they differ by more than --atol.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import tarfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

log = logging.getLogger("bench.finetune_delta")
PIECE_BYTES = 15 * 1024 * 1024
CHECK_TEXT = "The blacksmith of Ashford looks up from the anvil and says:"
WEIGHT_FILES = {"model.safetensors", "pytorch_model.bin"}
SMALL_FILE = 8 * 1024 * 1024  # the GGUF tokenizer's tokenizer.model (98 MB) stays behind
DELTA_FILES = {"index.json", "check.npz", "run.tgz"}


def _tensors(model: Any) -> dict[str, Any]:
    """Every distinct parameter tensor by name (a tied lm_head is its embedding, kept once)."""
    seen: set[int] = set()
    out = {}
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        out[name] = tensor
    return out


def _logits(model: Any, tokenizer_folder: Path) -> tuple[np.ndarray, np.ndarray]:
    import torch
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tokenizer_folder)(CHECK_TEXT)["input_ids"]
    with torch.no_grad():
        logits = model.float().eval()(torch.tensor([ids])).logits[0, -4:].numpy()
    return np.asarray(ids, dtype=np.int64), logits.astype(np.float32)


def pack(run: Path, source: str, out: Path) -> None:
    from transformers import AutoModelForCausalLM

    from npctalk.finetune.output import load_base

    out.mkdir(parents=True, exist_ok=True)
    tuned = AutoModelForCausalLM.from_pretrained(run, dtype="float32").eval()
    base = _tensors(load_base(source)[1].model)  # as `npctalk finetune` loaded it
    names, shapes, scales, chunks = [], [], [], []
    for name, tensor in _tensors(tuned).items():
        delta = (tensor.float() - base[name].float()).numpy().reshape(tensor.shape[0] if tensor.ndim > 1 else 1, -1)
        scale = np.abs(delta).max(axis=1, keepdims=True) / 127.0
        q = np.round(delta / np.where(scale > 0, scale, 1.0)).astype(np.int8)
        names.append(name)
        shapes.append(list(tensor.shape))
        scales.append(scale.astype(np.float32).ravel())
        chunks.append(q.tobytes())
    blob = zlib.compress(b"".join(chunks), 1)
    index = {"names": names, "shapes": shapes, "sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob)}
    pieces = [blob[i:i + PIECE_BYTES] for i in range(0, len(blob), PIECE_BYTES)]
    for k, piece in enumerate(pieces):
        (out / f"piece{k:02d}").write_bytes(piece)
    ids, logits = _logits(tuned, run)
    np.savez(out / "check.npz", ids=ids, logits=logits, scales=np.concatenate(scales))
    (out / "index.json").write_text(json.dumps(index))
    with tarfile.open(out / "run.tgz", "w:gz") as tar:
        for path in sorted(run.iterdir()):
            if path.is_file() and path.name not in WEIGHT_FILES and path.stat().st_size <= SMALL_FILE:
                tar.add(path, arcname=path.name)
    log.info("%d tensors, %.1f MiB deflated in %d pieces → %s", len(names), len(blob) / 2**20, len(pieces), out)


def unpack(folder: Path, source: str, output: Path, atol: float) -> float:
    import torch

    from npctalk.finetune.output import load_base, write_card

    index = json.loads((folder / "index.json").read_text())
    blob = b"".join(p.read_bytes() for p in sorted(folder.glob("piece*")))
    if len(blob) != index["bytes"] or hashlib.sha256(blob).hexdigest() != index["sha256"]:
        raise SystemExit(f"pieces in {folder} do not make the packed delta ({len(blob)} of {index['bytes']} bytes)")
    raw = np.frombuffer(zlib.decompress(blob), dtype=np.int8)
    check = np.load(folder / "check.npz")
    scales = check["scales"]
    base, loaded = load_base(source)
    model = loaded.model
    params = _tensors(model)
    offset = row = 0
    with torch.no_grad():
        for name, shape in zip(index["names"], index["shapes"]):
            size = int(np.prod(shape))
            rows = shape[0] if len(shape) > 1 else 1
            q = raw[offset:offset + size].reshape(rows, -1).astype(np.float32)
            delta = q * scales[row:row + rows, None]
            params[name].add_(torch.from_numpy(delta.reshape(shape)))
            offset, row = offset + size, row + rows
    if offset != raw.size or row != scales.size:
        raise SystemExit("the delta does not match the base model's tensors")
    output.mkdir(parents=True, exist_ok=True)
    loaded.tokenizer.save_pretrained(output)
    write_card(output, base)
    if (folder / "run.tgz").exists():
        with tarfile.open(folder / "run.tgz") as tar:
            tar.extractall(output, filter="data")
    for path in folder.iterdir():
        if path.is_file() and not path.name.startswith("piece") and path.name not in DELTA_FILES:
            (output / path.name).write_bytes(path.read_bytes())
    ids, logits = _logits(model, output)
    if not np.array_equal(ids, check["ids"]):
        raise SystemExit("the tokenizer gives other ids for the check prompt than on the GPU machine")
    diff = float(np.abs(logits - check["logits"]).max())
    if diff > atol:
        raise SystemExit(f"rebuilt model's logits differ from the fine-tuned model's by {diff:.2e} (> {atol})")
    model.save_pretrained(output)
    log.info("rebuilt %s: logits within %.2e of the fine-tuned model's on the GPU machine", output, diff)
    return diff


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack")
    p.add_argument("run", type=Path)
    p.add_argument("--source", default="default")
    p.add_argument("--out", type=Path, required=True)
    u = sub.add_parser("unpack")
    u.add_argument("folder", type=Path)
    u.add_argument("--source", default="default")
    u.add_argument("-o", "--output", type=Path, required=True)
    u.add_argument("--atol", type=float, default=1e-2, help="largest logit difference accepted")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "pack":
        pack(args.run, args.source, args.out)
    else:
        unpack(args.folder, args.source, args.output, args.atol)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
