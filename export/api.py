"""``export_bundle``: the one Python entry point behind ``export-onnx``.

Stages, each logged as ``[n/7] …``: resolve the source → load the PyTorch model → write the ONNX
graph (``lean``: npctalk's own fused graph, ``export/lean/``; ``optimum``: the traced export) → convert to the dtype → validate against PyTorch → write tokenizer, license, report and
manifest → publish. Everything is built in ``<output>.partial-<pid>``, the manifest written last,
and the folder renamed into place, so an interrupted or failed export (full disk included) never
leaves a folder that looks complete. An existing complete bundle for the same source, dtype and
device is returned at once (the cache for ``export-onnx default``).
"""

from __future__ import annotations

import dataclasses

import errno
import logging
import os
import re
import shutil
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from npctalk.engine import paths
from npctalk.engine.bundle import DEVICES, DTYPES, GRAPHS, Manifest, SourceInfo, load_manifest, write_manifest
from npctalk.engine.errors import BundleError, ConfigError, ExportError

from . import sources
from .chat_format import chat_format_from_tokenizer, end_of_turn_ids
from .convert import convert_to_onnx, describe_graph
from .lean import build_lean_graph
from .lean.graph import LAYOUTS
from .notices import resolve_license
from .optimize import optimize
from .progress import Stages
from .tokenizer_file import write_tokenizer_json
from .validate import PROMPT, OnnxDecoder, cuda_usable, validate, write_report

log = logging.getLogger(__name__)

STAGES = 7
DEFAULT_GRAPH = "lean"
AUTO = "auto"  # dtype: the precision the source ships in (auto_dtype)


@dataclass(frozen=True)
class ExportOptions:
    """What to build.

    dtype: ``auto`` | ``fp32`` | ``fp16`` | ``int8`` | ``int4`` (int8: dynamic quantization; int4: 4-bit
        weight-only MatMulNBits; both for the CPU provider). ``auto`` (``auto_dtype``): the precision
        the source ships in — int4 for the default model on the CPU (its GGUF is 4-bit; the bundle
        stores those very blocks), fp16 on CUDA, fp32 otherwise.
    device: ``cpu`` | ``cuda``, the execution provider the bundle is validated on and meant for.
    graph: ``lean`` (npctalk's fused graph, a few nodes per layer) | ``optimum`` (optimum's traced export).
    layout: the lean graph's inputs (``export/lean/graph.py``): ``mask`` (attention mask, left-padded
        batches; the CPU), ``slots`` (per-row lengths; CUDA's GroupQueryAttention takes no mask, and
        ``engine/slots.py`` decodes it with CUDA graphs) or ``auto`` (slots on CUDA, else mask).
    atol: validation limit, absolute, in logit units; None = the dtype's default (``validate.TOLERANCES``).
    force: rebuild even if ``output`` holds a bundle, or an incomplete folder.
    """

    dtype: str = AUTO
    device: str = "cpu"
    atol: float | None = None
    force: bool = False
    graph: str = DEFAULT_GRAPH
    layout: str = AUTO

    def __post_init__(self) -> None:
        if self.dtype not in (AUTO, *DTYPES):
            raise ConfigError(f"dtype must be one of {AUTO}, {', '.join(DTYPES)}, got {self.dtype!r}.")
        if self.device not in DEVICES:
            raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}.")
        if self.graph not in GRAPHS:
            raise ConfigError(f"graph must be one of {', '.join(GRAPHS)}, got {self.graph!r}.")
        if self.atol is not None and not self.atol >= 0:
            raise ConfigError(f"atol must be a number >= 0, got {self.atol!r}.")
        if self.layout not in (AUTO, *LAYOUTS):
            raise ConfigError(f"layout must be one of {AUTO}, {', '.join(LAYOUTS)}, got {self.layout!r}.")
        if self.layout == "slots" and self.graph != "lean":
            raise ConfigError("layout 'slots' is a lean-graph layout; use --graph lean.")

    @property
    def resolved_layout(self) -> str:
        """``mask`` or ``slots``: what ``auto`` means for this device and graph."""
        if self.layout != AUTO:
            return self.layout
        return "slots" if self.graph == "lean" and self.device == "cuda" else "mask"


def auto_dtype(source: str | Path, device: str = "cpu") -> str:
    """What ``dtype="auto"`` builds: int4 for the default model on the CPU (its weights are Q4_1
    blocks, stored exactly: +0.6% perplexity vs fp32, a quarter of the size, 2.3x the speed; see
    bench/results/quality-*), fp16 on CUDA, fp32 for everything else."""
    if device == "cuda":
        return "fp16"
    return "int4" if sources.identify(source).kind == "gguf-wheel" else "fp32"


def default_output(source: str | Path, dtype: str = AUTO, device: str = "cpu") -> Path:
    """``bundles_dir()/<model name>[-<dtype>][-cuda]``, no dtype suffix for the source's ``auto`` dtype;
    ``default`` in its auto dtype on the CPU is ``paths.default_bundle_path()``. CUDA bundles get their
    own folder, so building one never replaces the CPU bundle the engine runs by default."""
    info = sources.identify(source)
    if info.kind == "gguf-wheel":
        name = paths.DEFAULT_MODEL_NAME
    else:
        name = re.sub(r"[^a-z0-9._-]+", "-", info.id.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1].lower())
    plain = dtype in (AUTO, auto_dtype(source, device))
    name = name if plain else f"{name}-{dtype}"
    return paths.bundles_dir() / (f"{name}-cuda" if device == "cuda" else name)


def export_bundle(source: str | Path, output: str | Path | None = None, options: ExportOptions = ExportOptions()) -> Path:
    """Build a model bundle from ``source`` (folder, hub id or ``default``) into ``output``; return it.

    Raises ``ExportError`` (or a subclass: ``UnsupportedModelError``, ``SourceUnavailableError``,
    ``ValidationError``) with a message that says what to do; ``ConfigError`` for bad options.
    """
    cached = output is None  # npctalk's own bundle cache: a bundle built differently there is stale, not the user's
    if options.dtype == AUTO:
        options = dataclasses.replace(options, dtype=auto_dtype(source, options.device))
        log.info("dtype auto: %s", options.dtype)
    output = Path(output).expanduser() if output is not None else default_output(source, options.dtype, options.device)
    requested = sources.identify(source)
    if _reusable(output, requested, options, replace_stale=cached):
        return output
    _check_device(options.device)
    if options.dtype == "int8" and options.device == "cuda":
        log.warning("int8 bundles are made for the CPU provider; on CUDA most quantized ops fall back to the CPU.")
    _remove_stale_partials(output)
    partial = output.with_name(f"{output.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    stages = Stages(STAGES)
    try:
        partial.mkdir(parents=True)
        _build(source, partial, options, stages)
        stages.next(f"publishing the bundle at {output}")
        _publish(partial, output)
    except OSError as exc:
        shutil.rmtree(partial, ignore_errors=True)
        if exc.errno == errno.ENOSPC:
            raise ExportError(
                f"Disk full while writing the bundle next to {output} ({exc}). The partial export was removed; "
                "free some space (a bundle needs about 2-3x the model's fp32 size while it is built) and try again."
            ) from exc
        raise ExportError(f"Could not write the bundle at {output}: {exc}.") from exc
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    log.info("Bundle ready: %s (%.0f s)", output, stages.elapsed_s)
    return output


def _reusable(output: Path, requested: SourceInfo, options: ExportOptions, *, replace_stale: bool = False) -> bool:
    """True if ``output`` already holds this bundle; raise if it holds something else (unless forced).

    ``replace_stale``: ``output`` is the default cache location, so a bundle of the same source built
    with other options (an older graph builder, say) is rebuilt instead of refused.
    """
    if not output.exists() or options.force:
        return False
    if not output.is_dir():
        raise ExportError(f"{output} exists and is a file; choose another --output.")
    try:
        manifest = load_manifest(output)
    except BundleError:
        raise ExportError(
            f"{output} exists but is not a complete bundle (an interrupted export, or another folder); "
            "remove it or pass --force to rebuild it."
        ) from None
    layout = manifest.layout
    have = (manifest.source.kind, manifest.source.id, manifest.dtype, manifest.device, manifest.graph, layout)
    want = (requested.kind, requested.id, options.dtype, options.device, options.graph, options.resolved_layout)
    if have != want and replace_stale and have[:2] == want[:2]:
        log.info("Rebuilding the cached bundle at %s: it was built as (%s, %s, %s graph, %s layout), "
                 "(%s, %s, %s graph, %s layout) is asked for.", output, *have[2:], *want[2:])
        return False
    if have != want:
        raise ExportError(
            f"{output} already holds a bundle of {manifest.source.id} ({manifest.dtype}, {manifest.device}, "
            f"{manifest.graph} graph, {layout} layout), not {requested.id} ({options.dtype}, {options.device}, "
            f"{options.graph} graph, {options.resolved_layout} layout); pass --force to replace it or choose another --output."
        )
    log.info("Bundle already exists at %s; nothing to do (pass --force to rebuild).", output)
    return True


def _check_device(device: str) -> None:
    """Fail in a second, not after the export, when CUDA is asked for but unusable."""
    if device == "cuda" and not cuda_usable():
        raise ExportError(
            "--device cuda was asked for, but onnxruntime cannot use CUDA on this machine (no NVIDIA GPU, "
            "no onnxruntime-gpu, or missing CUDA/cuDNN libraries). Use --device cpu; fp16 bundles validate on the CPU too."
        )


def _remove_stale_partials(output: Path) -> None:
    """Delete ``<output>.partial-<pid>`` folders left by exports whose process is gone."""
    for stale in output.parent.glob(f"{output.name}.partial-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            log.info("Removing %s left by an interrupted export", stale)
            shutil.rmtree(stale, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _publish(partial: Path, output: Path) -> None:
    """Rename the finished ``partial`` folder to ``output``, replacing an old bundle there (``--force``)."""
    old = output.with_name(f"{output.name}.old-{os.getpid()}")
    if output.exists():
        output.rename(old)
    partial.rename(output)
    shutil.rmtree(old, ignore_errors=True)


def _build(source: str | Path, folder: Path, options: ExportOptions, stages: Stages) -> None:
    stages.next(f"resolving the source {source}")
    src = sources.resolve(source)
    stages.next(f"loading the PyTorch model from {src.folder}")
    loaded = sources.load_pretrained(src)
    config, tokenizer = loaded.config, loaded.tokenizer
    chat = chat_format_from_tokenizer(tokenizer) if getattr(tokenizer, "chat_template", None) else None
    model_path, weights = _write_graph(loaded.model, loaded.architecture, folder, options, stages)
    num_layers = config.num_hidden_layers
    graph = describe_graph(model_path, num_layers)
    eos = end_of_turn_ids(tokenizer, config.eos_token_id) if chat else tuple(
        int(i) for i in (config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]))
    pad = next(int(p) for p in (config.pad_token_id, tokenizer.pad_token_id, eos[0]) if p is not None)
    padding = ", left padding" if graph.io.get("attention_mask") else ""  # the slots layout never pads
    stages.next(f"validating against PyTorch on {options.device} (prefill + 8 decode steps{padding})")
    decoder = OnnxDecoder(model_path, graph.io, num_layers, options.device)
    prompt_ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    report = validate(decoder, loaded.model, prompt_ids, pad, options.dtype, options.atol)
    del decoder
    stages.next("writing tokenizer, license, validation report and manifest")
    write_tokenizer_json(tokenizer, folder)
    gguf_meta = loaded.extras.get("gguf", {})
    lic = resolve_license(src.name, (*src.hints, str(getattr(config, "_name_or_path", "")),
                                     str(gguf_meta.get("general.name", ""))), src.folder,
                          src.metadata_license or gguf_meta.get("general.license"))
    (folder / lic.info.file).write_text(lic.text, encoding="utf-8")
    write_report({**report, "source": src.info.id, "device": options.device, **({"weights": weights} if weights else {})}, folder)
    heads = config.num_attention_heads
    manifest = Manifest(
        name=src.name,
        architecture=loaded.architecture,
        dialogue_format="chat_template" if chat else "eos_joined",
        num_layers=num_layers,
        num_attention_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        hidden_size=config.hidden_size,
        vocab_size=config.vocab_size,
        max_context=getattr(config, "max_position_embeddings", None) or config.n_positions,
        eos_token_ids=eos,
        pad_token_id=pad,
        bos_token_id=config.bos_token_id,
        dtype=options.dtype,
        kv_dtype=graph.kv_dtype,
        device=options.device,
        source=src.info,
        license=lic.info,
        chat_format=chat,
        io=graph.io,
        graph=options.graph,
        npctalk_version=_version(),
    )
    write_manifest(folder, manifest)


def _write_graph(model: Any, architecture: str, folder: Path, options: ExportOptions,
                 stages: Stages) -> tuple[Path, dict[str, int]]:
    """Stages 3 and 4: the decoder graph in ``options.dtype`` at ``folder/model.onnx``, and how its
    weights were stored (``optimize``'s counts)."""
    if options.graph == "optimum":
        stages.next("exporting the ONNX graph with optimum (fp32, KV cache)")
        model_path = convert_to_onnx(model, folder)
        stages.next(f"converting the graph to {options.dtype}")
        return model_path, optimize(model_path, options.dtype)
    # The lean graph is written in fp16 directly. Quantized dtypes start from fp32 with the LM head
    # as its own (hidden, vocab) MatMul: the quantizers need a constant MatMul weight, and rewriting
    # the tied Gemm(transB=1) would transpose the embedding its Gather still reads.
    built = options.dtype if options.dtype in ("fp32", "fp16") else "fp32"
    stages.next(f"exporting the lean ONNX graph (written from the weights; {built}, KV cache, "
                f"{options.resolved_layout} layout)")
    model_path = build_lean_graph(model, architecture, folder, built, untie_lm_head=built != options.dtype,
                                  layout=options.resolved_layout)
    stages.next(f"converting the graph to {options.dtype}")
    if built == options.dtype:
        log.info("%s: the lean graph was written in this precision", options.dtype)
        return model_path, {}
    return model_path, optimize(model_path, options.dtype)


def _version() -> str:
    try:
        return metadata.version("npctalk")
    except metadata.PackageNotFoundError:
        return ""
