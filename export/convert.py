"""Step 1 of export: PyTorch decoder → one ONNX graph with KV cache (past in, present out).

optimum's ``text-generation-with-past`` export gives exactly the bundle's I/O contract
(see ``npctalk.engine.bundle``): past of length 0 makes the same graph do prefill.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from npctalk.engine.errors import ExportError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

OPSET = 17


def convert_to_onnx(model: PreTrainedModel, out_dir: Path, *, device: str = "cpu") -> Path:
    """Export ``model`` as ``out_dir/model.onnx`` (+ ``model.onnx.data`` when large). Returns the path.

    Runs optimum without its own validation: ours (``validate.py``) checks prefill and cached decode.
    """
    from optimum.exporters.onnx import onnx_export_from_model

    out_dir.mkdir(parents=True, exist_ok=True)
    # optimum writes config/generation files beside the graph; keep only the graph.
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".optimum-") as tmp:
        try:
            onnx_export_from_model(
                model, tmp, opset=OPSET, task="text-generation-with-past",
                do_validation=False, device=device,
            )
        except Exception as exc:  # optimum raises bare Exceptions of many kinds
            raise ExportError(f"optimum could not export the decoder to ONNX: {type(exc).__name__}: {exc}") from exc
        produced = Path(tmp)
        if not (produced / "model.onnx").is_file():
            raise ExportError(f"optimum finished but wrote no model.onnx (found: {sorted(p.name for p in produced.iterdir())}).")
        for name in ("model.onnx", "model.onnx_data", "model.onnx.data"):
            if (produced / name).exists():
                shutil.move(str(produced / name), out_dir / name)
    log.info("ONNX graph written: %s", out_dir / "model.onnx")
    return out_dir / "model.onnx"
