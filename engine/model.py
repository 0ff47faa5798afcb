"""A loaded bundle: ONNX Runtime session, tokenizer, manifest, and one forward step over a KV cache.

``Model.forward`` is the only place that talks to ONNX Runtime. It feeds exactly the inputs the
graph declares (older GPT-2 graphs take no ``attention_mask``/``position_ids``; the engine computes
them when they are asked for) and returns the logits of the last position only.

Thread-safety: ``forward`` may be called from several threads with different caches (ONNX Runtime's
``run`` is thread-safe); a ``KVCache`` itself belongs to one caller.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnxruntime as ort

from .bundle import DEFAULT_IO, Manifest, load_manifest
from .errors import BundleError, ConfigError, ContextOverflowError, GenerationError
from .kv_cache import KV_DTYPES, KVCache
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

Provider = Literal["auto", "cpu", "cuda"]
CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
KV_GROWTH = 256  # positions an in-place KV buffer grows by when full: one copy per 256 tokens, not per token
KV_HEADROOM_BYTES = 64 * 2**20  # ... but a batch's spare room stays under this (64 rows of SmolLM2: 22 positions)
ORT_INT_TYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}
ORT_FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


@dataclass(frozen=True)
class GraphIO:
    """The graph's real input/output names; ``attention_mask``/``position_ids`` None when not declared."""

    input_ids: str
    attention_mask: str | None
    position_ids: str | None
    past_keys: tuple[str, ...]
    past_values: tuple[str, ...]
    logits: str
    present_keys: tuple[str, ...]
    present_values: tuple[str, ...]
    id_dtype: type
    seqlens_k: str | None = None      # the slots layout (lean CUDA graphs): per-row lengths instead of a mask
    total_length: str | None = None
    next_token: str | None = None     # slots layout: the logits' argmax, (batch, 1, 1) int64

    @property
    def slots(self) -> bool:
        """True for the slots layout (``export/lean/graph.py``): no mask, so rows are never padded."""
        return self.seqlens_k is not None

    @classmethod
    def resolve(cls, manifest: Manifest, session: ort.InferenceSession) -> GraphIO:
        """Match ``manifest.io`` against what the session declares; ``BundleError`` on any mismatch."""
        io, layers = manifest.io, range(manifest.num_layers)
        inputs = {i.name: i.type for i in session.get_inputs()}
        outputs = {o.name for o in session.get_outputs()}

        def optional(key: str) -> str | None:
            # Fed exactly when the graph declares it, under the manifest's name or the contract's default.
            name = io.get(key) or DEFAULT_IO[key]
            return name if name in inputs else None

        argmax = io.get("next_token") or DEFAULT_IO["next_token"]
        found = cls(
            input_ids=io["input_ids"], attention_mask=optional("attention_mask"), position_ids=optional("position_ids"),
            past_keys=tuple(io["past_key"].format(layer=i) for i in layers),
            past_values=tuple(io["past_value"].format(layer=i) for i in layers),
            logits=io["logits"],
            present_keys=tuple(io["present_key"].format(layer=i) for i in layers),
            present_values=tuple(io["present_value"].format(layer=i) for i in layers),
            id_dtype=ORT_INT_TYPES.get(inputs.get(io["input_ids"], ""), np.int64),
            seqlens_k=optional("seqlens_k"), total_length=optional("total_sequence_length"),
            next_token=argmax if argmax in outputs else None,
        )
        fed = {found.input_ids, found.attention_mask, found.position_ids, found.seqlens_k, found.total_length,
               *found.past_keys, *found.past_values}
        missing_in = sorted(n for n in fed - {None} if n not in inputs)
        unknown_in = sorted(set(inputs) - fed)
        missing_out = sorted({found.logits, *found.present_keys, *found.present_values} - outputs)
        if missing_in or unknown_in or missing_out:
            raise BundleError(
                f"{manifest.model_file} does not match the manifest's I/O: graph lacks inputs {missing_in} and "
                f"outputs {missing_out}, and declares inputs {unknown_in} the engine cannot feed. Re-export the bundle."
            )
        kv_type = ORT_FLOAT_TYPES.get(inputs[found.past_keys[0]]) if found.past_keys else None
        if found.slots and (found.total_length is None or found.position_ids is None):
            raise BundleError(f"{manifest.model_file} takes seqlens_k without total_sequence_length/position_ids; "
                              "it fits no layout the engine knows. Re-export the bundle.")
        if kv_type is not KV_DTYPES[manifest.kv_dtype]:
            raise BundleError(f"The manifest says kv_dtype {manifest.kv_dtype} but the graph's past is "
                              f"{inputs.get(found.past_keys[0]) if found.past_keys else 'absent'}. Re-export the bundle.")
        return found


class Model:
    """A bundle ready to run. ``provider`` is ``"cpu"``, ``"cuda"`` or ``"auto"`` (CUDA if it starts).

    Slots-layout bundles (``export-onnx --device cuda``) run here too, one row per stream, but on CUDA
    this plain path moves the whole cache through host memory every step; open them with
    ``slot_model.open_model`` (the slot decoder, as chat and serve do).

    ``inplace_kv``: extend the KV cache in place (lean graphs on the CPU; see ``kv_cache``), its
    buffers growing ``kv_growth`` positions at a time; False: the plain path (the graph's
    ``present.*`` outputs replace the cache every step). Both give the same numbers.
    ``intra_op_threads`` caps ONNX Runtime's worker threads (None: one per core); a game that
    shares the CPU with its own frame loop should set it to a few cores. ``spin``: whether idle
    worker threads busy-wait for the next operator (ONNX Runtime's default, on) or sleep (off: less
    CPU taken from the game between operators, at some latency; bench/threads.py measures both).
    """

    def __init__(self, bundle_path: str | Path, *, provider: Provider = "auto", intra_op_threads: int | None = None,
                 spin: bool = True, inplace_kv: bool = True, kv_growth: int = KV_GROWTH) -> None:
        self.path = Path(bundle_path)
        self.manifest = load_manifest(self.path)
        self.tokenizer = Tokenizer.from_file(self.path / self.manifest.tokenizer_file)
        self.session = _create_session(self.path / self.manifest.model_file, provider, intra_op_threads, spin)
        self.intra_op_threads, self.spin = intra_op_threads, spin
        self.provider = "cuda" if self.session.get_providers()[0] == CUDA else "cpu"
        self.io = GraphIO.resolve(self.manifest, self.session)
        self._outputs = [self.io.logits, *self.io.present_keys, *self.io.present_values]
        if not isinstance(kv_growth, int) or isinstance(kv_growth, bool) or kv_growth < 1:
            raise ConfigError(f"kv_growth must be a positive number of positions, got {kv_growth!r}.")
        # In-place KV needs GroupQueryAttention's shared past/present buffers (every lean graph) and
        # host memory buffers (the CPU provider; on CUDA they would have to live on the device).
        self.inplace_kv = bool(inplace_kv) and self.manifest.graph == "lean" and self.provider == "cpu" \
            and self.io.attention_mask is not None and self.io.position_ids is not None
        self.kv_growth = kv_growth
        m = self.manifest  # bytes one position of one row takes in every layer's keys and values
        self._kv_position_bytes = 2 * m.num_layers * m.num_kv_heads * m.head_dim * np.dtype(KV_DTYPES[m.kv_dtype]).itemsize
        log.info("Loaded %s (%s, %d layers, context %d) on %s", self.manifest.name, self.manifest.dtype,
                 self.manifest.num_layers, self.manifest.max_context, self.provider)

    def new_cache(self, batch_size: int = 1) -> KVCache:
        """An empty KV cache for ``batch_size`` streams."""
        return KVCache.for_manifest(self.manifest, batch_size)

    def forward(self, input_ids: np.ndarray, cache: KVCache) -> np.ndarray:
        """Run ``input_ids`` (batch, seq) after ``cache``; return last-position logits (batch, vocab)
        as float32 and extend ``cache`` by ``seq`` positions. Raises before exceeding ``max_context``."""
        ids = np.asarray(input_ids, dtype=self.io.id_dtype)
        if ids.ndim != 2 or ids.shape[0] != cache.batch_size or ids.shape[1] == 0:
            raise GenerationError(f"input_ids must be (batch={cache.batch_size}, seq>=1), got shape {ids.shape}.")
        if ids.min() < 0 or ids.max() >= self.manifest.vocab_size:
            raise GenerationError(f"Token ids must be in [0, {self.manifest.vocab_size}), got {ids.min()}..{ids.max()}.")
        batch, seq = ids.shape
        total = cache.length + seq
        if total > self.manifest.max_context:
            raise ContextOverflowError(
                f"{seq} new tokens after {cache.length} cached make {total}, more than the model's context of "
                f"{self.manifest.max_context} tokens; shorten the dialogue history or the reply."
            )
        mask = np.concatenate([cache.mask, np.ones((batch, seq), dtype=np.int64)], axis=1)  # (batch, past + seq)
        feed: dict[str, np.ndarray] = {self.io.input_ids: ids}
        if self.io.slots:  # lengths instead of a mask: every row is all real tokens (batch.py never pads these)
            if not mask.all():
                raise GenerationError("This bundle's graph has the slots layout (no attention mask), so it cannot "
                                      "run a left-padded batch; decode its streams one row each, or with engine/slots.py.")
            feed[self.io.seqlens_k] = np.full(batch, total - 1, dtype=np.int32)
            feed[self.io.total_length] = np.array(total, dtype=np.int32)
        if self.io.attention_mask:
            feed[self.io.attention_mask] = mask.astype(self.io.id_dtype)
        if self.io.position_ids:
            # Position = number of real tokens before it, so left padding (batching) keeps positions right.
            positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)[:, -seq:]  # (batch, seq)
            feed[self.io.position_ids] = positions.astype(self.io.id_dtype)
        if self.inplace_kv:
            logits = self._forward_in_place(feed, cache, total, mask)
        else:
            feed.update(zip(self.io.past_keys, cache.keys))  # each (batch, kv_heads, past, head_dim)
            feed.update(zip(self.io.past_values, cache.values))
            logits, *presents = self.session.run(self._outputs, feed)  # logits (batch, seq, vocab)
            layers = self.manifest.num_layers
            cache.update(presents[:layers], presents[layers:], mask)  # each (batch, kv_heads, past + seq, head_dim)
        return np.ascontiguousarray(logits[:, -1, :], dtype=np.float32)  # (batch, vocab)

    def kv_room(self, rows: int) -> int:
        """Spare positions an in-place KV buffer of ``rows`` rows gets when (re)allocated:
        ``kv_growth``, fewer for a big batch so the spare room stays under KV_HEADROOM_BYTES (still
        one copy per >= 16 steps instead of one per step)."""
        per_position = self._kv_position_bytes * max(1, rows)
        return min(self.kv_growth, max(16, KV_HEADROOM_BYTES // max(1, per_position)))

    def _forward_in_place(self, feed: dict[str, np.ndarray], cache: KVCache, total: int, mask: np.ndarray) -> np.ndarray:
        """One step with each layer's cache buffer bound as both past and present: GroupQueryAttention
        writes the new positions into it (shared-buffer mode), so no cache is copied."""
        keys, values = cache.reserve(total, min(self.manifest.max_context, total + self.kv_room(cache.batch_size)))
        io_binding = cache.binding
        if io_binding is None:  # new buffers: bind them once; later steps only re-bind the small inputs
            io_binding = self.session.io_binding()
            io_binding.bind_output(self.io.logits)  # output 0 (re-bound below: a new array each step)
            for names, buffers in ((zip(self.io.past_keys, self.io.present_keys), keys),
                                   (zip(self.io.past_values, self.io.present_values), values)):
                for (past, present), buffer in zip(names, buffers):  # buffer (batch, kv_heads, capacity, head_dim)
                    value = ort.OrtValue.ortvalue_from_numpy(buffer)  # wraps the numpy memory, no copy
                    io_binding.bind_ortvalue_input(past, value)
                    io_binding.bind_ortvalue_output(present, value)
            cache.binding = io_binding
        for name, array in feed.items():
            io_binding.bind_cpu_input(name, array)
        io_binding.bind_output(self.io.logits)
        self.session.run_with_iobinding(io_binding)
        cache.advance(mask)
        return io_binding.get_outputs()[0].numpy()  # logits (batch, 1, vocab)


def _create_session(model_file: Path, provider: str, intra_op_threads: int | None, spin: bool = True,
                    cuda_options: dict[str, str] | None = None) -> ort.InferenceSession:
    """An ONNX Runtime session on CUDA (``cuda``; ``auto`` when usable) or the CPU. ``cuda_options``:
    the CUDA provider's options (``engine/slots.py`` turns on CUDA graphs with them)."""
    if provider not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"provider must be 'auto', 'cpu' or 'cuda', got {provider!r}.")
    if intra_op_threads is not None and (not isinstance(intra_op_threads, int) or intra_op_threads < 1):
        raise ConfigError(f"intra_op_threads must be a positive integer or None, got {intra_op_threads!r}.")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = intra_op_threads or 0  # 0: ONNX Runtime picks one per physical core
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    available = ort.get_available_providers()
    if provider == "cuda" and CUDA not in available:
        raise ConfigError(f"provider='cuda' was requested but this onnxruntime build has no CUDA support "
                          f"(it offers {available}); install onnxruntime-gpu or use provider='cpu'.")
    want_cuda = provider == "cuda" or (provider == "auto" and CUDA in available)
    try:
        if want_cuda and provider == "auto":
            # A machine without CUDA libraries makes ONNX Runtime log an error before falling back;
            # for "auto" that fallback is expected, so keep the game's console quiet and log it ourselves.
            ort.set_default_logger_severity(4)
        providers: list[Any] = [(CUDA, cuda_options or {}), CPU] if want_cuda else [CPU]
        session = ort.InferenceSession(str(model_file), options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own untyped errors for unreadable graphs
        raise BundleError(f"ONNX Runtime cannot load {model_file}: {exc}") from exc
    finally:
        if want_cuda and provider == "auto":
            ort.set_default_logger_severity(2)  # ONNX Runtime's default (warnings)
    running = session.get_providers()
    if want_cuda and CUDA not in running:
        if provider == "cuda":
            raise ConfigError("provider='cuda' was requested but ONNX Runtime could not start CUDA (missing CUDA/cuDNN "
                              "libraries or no GPU); use provider='cpu' or 'auto'.")
        log.info("CUDA is not usable here (missing libraries or no GPU); running on the CPU.")
    return session
