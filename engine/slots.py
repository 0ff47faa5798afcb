"""The fast decode path: a fixed set of KV "slots" on the device, decoded in place, with CUDA graphs.

A slots-layout bundle (``export-onnx --device cuda``, see ``export/lean/graph.py``) takes each
row's length instead of an attention mask. ``SlotDecoder`` keeps, per layer, one key and one value
buffer of (slots, kv_heads, capacity + 1, head_dim) on the session's device, allocated once. Every
run binds them as both ``past`` and ``present``, so GroupQueryAttention writes the new positions in
place: no cache is copied or allocated while decoding.

- ``prefill(slot, ids)``: one stream's prompt, or a further chunk after what the slot holds, run as
  batch 1 over a view of that slot's part of every buffer (the slot axis is outermost, so the view
  is a pointer offset).
- ``prefill_many(slots, prompts)``: several new streams' prompts at once, for a burst of NPCs
  starting to talk. Each run of consecutive empty slots takes all but the last token of its
  prompts in one batch (right-padded: attention is causal, so a row's real positions never see its
  padding, and what the padding writes past a row's length is overwritten before it is read); then
  one ``step`` feeds every prompt's last token, which gives each row's logits at its own last
  position (the graph returns the last padded position only).
- ``snapshot(slot, n)`` / ``restore(slot, snapshot)``: a slot's first ``n`` positions copied out,
  and into an empty slot (``slot_copy.py``): an NPC's persona prefix is read once, then each turn
  starts from its copy.
- ``step(tokens)``: one token for every active slot at once. Only the first ``rows`` slots run, a
  power of two covering the last active one (streams take the lowest free slot), so one stream in a
  64-slot decoder costs one row. Ids, positions and lengths sit in device buffers at fixed
  addresses, one set per row count; with ``cuda_graph`` ONNX Runtime captures the step and replays it
  (fixed shapes and addresses). ``total_sequence_length``, a host value the capture bakes in, only
  sizes the attention kernel's work split in a shared-buffer decode step (each row's real length
  is read from ``seqlens_k`` on the device), so it is the longest slot rounded up to
  ``LENGTH_BUCKET``; each (rows, bucket) is its own graph: a short context in a big buffer stays fast.
- What leaves the device per step: the greedy token of each slot (the graph's ``next_token``,
  8 bytes a slot), or the logits when a caller samples (``logits()``).

A slot left out of a step (``active``) writes its ignored position at its own length without
advancing, so its content stays intact (hence the one spare position per slot). Prefill runs
never use the CUDA graph. The CPU provider runs the same code with host buffers and no graphs;
the tests compare it token for token with ``Model``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from .bundle import load_manifest
from .errors import BundleError, ConfigError, ContextOverflowError, GenerationError
from .kv_cache import KV_DTYPES
from .model import CUDA, GraphIO, Provider, _create_session
from .slot_copy import SlotCopier, SlotSnapshot
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _StepBinding:
    """A step over the first ``rows`` slots: its IOBinding and the device buffers bound in it."""

    binding: Any
    ids: ort.OrtValue
    positions: ort.OrtValue
    seqlens: ort.OrtValue
    logits: ort.OrtValue
    next: ort.OrtValue


SKIP_GRAPH = "-1"  # ONNX Runtime's gpu_graph_id that runs without capturing or replaying a CUDA graph
# A step's total_sequence_length: the longest slot's length rounded up to this many positions. The
# attention kernel sizes its work split by it (the real lengths come from seqlens_k), so a small
# value keeps short contexts fast in a big buffer; each bucket is its own captured CUDA graph.
LENGTH_BUCKET = 128


class SlotDecoder:
    """``slots`` streams of at most ``capacity`` tokens each (default: the model's context).

    ``provider``: ``cpu``, ``cuda`` or ``auto``. ``cuda_graph``: capture the decode step as a CUDA
    graph (CUDA only; ``self.cuda_graph`` says whether it is in use; if ONNX Runtime refuses, the
    decoder falls back to plain runs and ``fallback_reason`` says why). Not thread-safe.
    """

    def __init__(self, bundle_path: str | Path, slots: int, capacity: int | None = None, *,
                 provider: Provider = "auto", cuda_graph: bool = True, intra_op_threads: int | None = None) -> None:
        self.path = Path(bundle_path)
        self.manifest = load_manifest(self.path)
        m = self.manifest
        if not isinstance(slots, int) or isinstance(slots, bool) or slots < 1:
            raise ConfigError(f"slots must be a positive integer, got {slots!r}.")
        capacity = m.max_context if capacity is None else capacity
        if not isinstance(capacity, int) or not 1 <= capacity <= m.max_context:
            raise ConfigError(f"capacity must be 1..{m.max_context} tokens (the model's context), got {capacity!r}.")
        self.slots, self.capacity = slots, capacity
        self.tokenizer = Tokenizer.from_file(self.path / m.tokenizer_file)
        self.fallback_reason = ""
        self.session = self._session(provider, cuda_graph, intra_op_threads)
        self.io = GraphIO.resolve(m, self.session)
        if not self.io.slots or self.io.next_token is None:
            raise BundleError(f"{self.path} has the mask layout; the slot decoder needs a slots-layout bundle "
                              "(`export-onnx MODEL --graph lean --layout slots`, the default with --device cuda).")
        self.device = "cuda" if self.session.get_providers()[0] == CUDA else "cpu"
        self.cuda_graph = cuda_graph and self.device == "cuda"
        self.lengths = np.zeros(slots, dtype=np.int64)  # tokens each slot holds
        self._kv_dtype = KV_DTYPES[m.kv_dtype]
        self._physical = capacity + 1  # one spare position: where a slot left out of a step writes
        self._slot_shape = [1, m.num_kv_heads, self._physical, m.head_dim]
        self._slot_bytes = m.num_kv_heads * self._physical * m.head_dim * np.dtype(self._kv_dtype).itemsize
        self._host: list[np.ndarray] = []  # CPU provider: the numpy arrays step bindings wrap (kept alive)
        self._keys, key_arrays = self._buffers(m.num_layers)      # (slots, kv_heads, capacity + 1, head_dim)
        self._values, value_arrays = self._buffers(m.num_layers)
        self._kv_arrays = [*key_arrays, *value_arrays] if self.device == "cpu" else None  # keys then values
        self._copier: SlotCopier | None = None  # made by the first snapshot
        self.copy_graphs = False  # True before the first snapshot: the CPU copies by the GPU's graphs too (tests)
        self._total_host = np.array(self._physical, np.int32)  # total_sequence_length: () stays on the CPU
        self._total = ort.OrtValue.ortvalue_from_numpy(self._total_host)
        self._steps: dict[int, _StepBinding] = {}  # step bindings by row count
        self._graphs_ran: set[str] = set()  # gpu_graph_ids that have run (captured) without error
        self._last_logits: ort.OrtValue | None = None  # the last run's logits, for ``logits()``
        log.info("Slot decoder: %s on %s, %d slots x %d tokens, KV %.1f MB, CUDA graph %s", m.name, self.device, slots,
                 capacity, self.kv_bytes / 1e6, "on" if self.cuda_graph else f"off{' (' + self.fallback_reason + ')' if self.fallback_reason else ''}")

    # --- setup --------------------------------------------------------------------------------------

    def _session(self, provider: Provider, cuda_graph: bool, threads: int | None) -> ort.InferenceSession:
        model_file = self.path / self.manifest.model_file
        # Arena chunks of the size asked for, not the next power of two: the buffers here are allocated
        # once, so doubling only strands device memory.
        arena = {"arena_extend_strategy": "kSameAsRequested"}
        if not cuda_graph:
            return _create_session(model_file, provider, threads, cuda_options=arena)
        try:
            return _create_session(model_file, provider, threads, cuda_options={**arena, "enable_cuda_graph": "1"})
        except Exception as exc:  # ONNX Runtime refuses graph capture for some graphs: run without it
            if provider == "cpu":
                raise
            self.fallback_reason = f"ONNX Runtime refused CUDA graphs: {str(exc).splitlines()[0][:200]}"
            log.warning("%s; decoding without them.", self.fallback_reason)
            return _create_session(model_file, provider, threads, cuda_options=arena)

    @property
    def kv_bytes(self) -> int:
        """Bytes of all KV buffers together (allocated once, at construction)."""
        return 2 * self.manifest.num_layers * self.slots * self._slot_bytes

    def _buffers(self, count: int) -> tuple[list[ort.OrtValue], list[np.ndarray]]:
        """``count`` zeroed KV buffers (slots, kv_heads, capacity + 1, head_dim) on the decoder's device,
        and on the CPU the numpy arrays they wrap (kept alive by the caller; the snapshot copier slices
        them); on a GPU no arrays."""
        shape = (self.slots, *self._slot_shape[1:])
        values, arrays = [], []
        for _ in range(count):
            zeros = np.zeros(shape, dtype=self._kv_dtype)  # never-written positions are zeros, not garbage
            if self.device == "cpu":
                arrays.append(zeros)
                values.append(ort.OrtValue.ortvalue_from_numpy(zeros))  # wraps the array: writes land in it
            else:
                values.append(ort.OrtValue.ortvalue_from_numpy(zeros, "cuda", 0))  # copied to the GPU
        return values, arrays

    def _device_value(self, array: np.ndarray) -> ort.OrtValue:
        if self.device == "cpu":
            self._host.append(array)
            return ort.OrtValue.ortvalue_from_numpy(array)
        return ort.OrtValue.ortvalue_from_numpy(array, "cuda", 0)

    def _step_binding(self, rows: int) -> _StepBinding:
        """The binding of a step over slots 0..rows-1, made once per row count: every input and output
        at a fixed address (CUDA graphs need it); the KV buffers' first ``rows`` slots by pointer."""
        made = self._steps.get(rows)
        if made is not None:
            return made
        io, vocab = self.io, self.manifest.vocab_size
        made = _StepBinding(
            self.session.io_binding(),
            ids=self._device_value(np.zeros((rows, 1), np.int64)),                  # (rows, 1)
            positions=self._device_value(np.zeros((rows, 1), np.int64)),            # (rows, 1)
            seqlens=self._device_value(np.zeros(rows, np.int32)),                    # (rows,) length - 1 after the step
            logits=self._device_value(np.zeros((rows, 1, vocab), np.float32)),      # (rows, 1, vocab)
            next=self._device_value(np.zeros((rows, 1, 1), np.int64)),              # (rows, 1, 1)
        )
        binding = made.binding
        for name, value in ((io.input_ids, made.ids), (io.position_ids, made.positions),
                            (io.seqlens_k, made.seqlens), (io.total_length, self._total)):
            binding.bind_ortvalue_input(name, value)
        self._bind_cache(binding, [rows, *self._slot_shape[1:]], 0)  # slots 0..rows-1
        binding.bind_ortvalue_output(io.logits, made.logits)
        binding.bind_ortvalue_output(io.next_token, made.next)
        self._steps[rows] = made
        return made

    def _bind_cache(self, binding: Any, shape: list[int], offset: int) -> None:
        """Bind every layer's KV buffer as both past and present: ``shape`` (rows, kv_heads,
        capacity + 1, head_dim) starting ``offset`` bytes in (the slot axis is outermost)."""
        io, element = self.io, np.dtype(self._kv_dtype).type
        for names, buffers in ((zip(io.past_keys, io.present_keys), self._keys),
                               (zip(io.past_values, io.present_values), self._values)):
            for (past, present), buffer in zip(names, buffers):
                binding.bind_input(past, self.device, 0, element, shape, buffer.data_ptr() + offset)
                binding.bind_output(present, self.device, 0, element, shape, buffer.data_ptr() + offset)

    @staticmethod
    def _run_options(graph_id: str) -> ort.RunOptions:
        options = ort.RunOptions()
        options.add_run_config_entry("gpu_graph_id", graph_id)
        return options

    # --- decoding -----------------------------------------------------------------------------------

    def _check_slot(self, slot: int) -> None:
        if not isinstance(slot, (int, np.integer)) or not 0 <= slot < self.slots:
            raise GenerationError(f"slot must be 0..{self.slots - 1}, got {slot!r}.")

    def prefill(self, slot: int, ids: Sequence[int] | np.ndarray) -> int:
        """Run ``ids`` after what ``slot`` holds (an empty slot: a prompt); return the greedy next token.

        ``logits()`` afterwards gives that position's logits (1, vocab) for sampling.
        """
        self._check_slot(slot)
        past = int(self.lengths[slot])
        tokens = self._checked_prompt(slot, ids, past).reshape(1, -1)                # (1, n)
        total = past + tokens.shape[1]
        io, binding = self.io, self.session.io_binding()
        binding.bind_cpu_input(io.input_ids, tokens)
        binding.bind_cpu_input(io.position_ids, np.arange(past, total, dtype=np.int64)[None])   # (1, n)
        binding.bind_cpu_input(io.seqlens_k, np.array([total - 1], np.int32))
        binding.bind_cpu_input(io.total_length, np.array(total, np.int32))
        binding.bind_output(io.logits, self.device)       # outputs 0 and 1 (ONNX Runtime allocates them)
        binding.bind_output(io.next_token, self.device)
        self._bind_cache(binding, self._slot_shape, slot * self._slot_bytes)  # this slot alone
        self.session.run_with_iobinding(binding, self._run_options(SKIP_GRAPH))
        logits, next_token = binding.get_outputs()[:2]
        self._last_logits = logits  # (1, 1, vocab), for logits()
        self.lengths[slot] = total
        return int(next_token.numpy().reshape(-1)[0])

    def prefill_many(self, slots: Sequence[int], prompts: Sequence[Sequence[int] | np.ndarray]) -> np.ndarray:
        """Prefill ``prompts[i]`` into the empty slot ``slots[i]``, as many batches as there are runs of
        consecutive slots plus one step; return each prompt's greedy next token, (len(slots),) int64.

        The same KV and logits as ``prefill`` one slot at a time (the tests hold it to that);
        ``logits()`` afterwards is the step's (rows, vocab), indexed by slot. Slots must differ and
        be empty (a further chunk after a slot's content goes through ``prefill``).
        """
        if len(slots) != len(prompts) or not slots:
            raise GenerationError(f"prefill_many takes one prompt per slot, got {len(slots)} slots and {len(prompts)} prompts.")
        for slot in slots:
            self._check_slot(slot)
        if len(set(int(s) for s in slots)) != len(slots):
            raise GenerationError(f"prefill_many got a slot twice: {list(slots)}.")
        taken = [int(s) for s in slots if self.lengths[s] > 0]
        if taken:
            raise GenerationError(f"slots {taken} are not empty: prefill_many starts new streams only.")
        rows = [self._checked_prompt(int(s), p, past=0) for s, p in zip(slots, prompts)]  # (n,) int64 each
        order = [int(i) for i in np.argsort(np.asarray(slots))]
        # Runs of consecutive slot numbers: a run's slots are one pointer view of every KV buffer.
        cuts = [k for k in range(1, len(order)) if int(slots[order[k]]) != int(slots[order[k - 1]]) + 1]
        for start, end in zip([0, *cuts], [*cuts, len(order)]):
            run = order[start:end]  # indices into slots / rows
            self._prefill_run([int(slots[i]) for i in run], [rows[i][:-1] for i in run])
        tokens = np.zeros(self.slots, dtype=np.int64)
        active = np.zeros(self.slots, dtype=bool)
        tokens[list(slots)] = [row[-1] for row in rows]
        active[list(slots)] = True
        return self._step(tokens, active)[list(slots)]

    def _checked_prompt(self, slot: int, ids: Sequence[int] | np.ndarray, past: int) -> np.ndarray:
        """``ids`` as (n,) int64, n >= 1, valid token ids that fit after ``past`` tokens in ``slot``."""
        tokens = np.asarray(ids, dtype=np.int64).reshape(-1)
        n = tokens.shape[0]
        if n == 0:
            raise GenerationError("prefill needs at least one token.")
        if tokens.min() < 0 or tokens.max() >= self.manifest.vocab_size:
            raise GenerationError(f"Token ids must be in [0, {self.manifest.vocab_size}), got {tokens.min()}..{tokens.max()}.")
        if past + n > self.capacity:
            raise ContextOverflowError(f"{n} new tokens after {past} in slot {slot} make {past + n}, more than the slot's "
                                       f"{self.capacity} tokens; shorten the prompt or rewind the slot.")
        return tokens

    def _prefill_run(self, slots: list[int], bodies: list[np.ndarray]) -> None:
        """One batch over the consecutive empty ``slots``: each body from position 0, right-padded to
        the longest (a slot's view of the KV buffers starts at the run's first slot)."""
        width = max(len(body) for body in bodies)
        if width == 0:
            return  # one-token prompts: the step feeds them
        n = len(slots)
        ids = np.zeros((n, width), dtype=np.int64)                                     # (n, width), 0-padded
        for row, body in enumerate(bodies):
            ids[row, :len(body)] = body
        io, binding = self.io, self.session.io_binding()
        binding.bind_cpu_input(io.input_ids, ids)
        binding.bind_cpu_input(io.position_ids, np.tile(np.arange(width, dtype=np.int64), (n, 1)))   # (n, width)
        # A first prompt (total == width): the kernel masks causally; a row's padding lies after its keys.
        binding.bind_cpu_input(io.seqlens_k, np.array([max(len(b), 1) - 1 for b in bodies], np.int32))
        binding.bind_cpu_input(io.total_length, np.array(width, np.int32))
        binding.bind_output(io.logits, self.device)       # unused: each row's logits come from the step
        binding.bind_output(io.next_token, self.device)
        self._bind_cache(binding, [n, *self._slot_shape[1:]], slots[0] * self._slot_bytes)
        self.session.run_with_iobinding(binding, self._run_options(SKIP_GRAPH))
        for slot, body in zip(slots, bodies):
            self.lengths[slot] = len(body)

    def step(self, tokens: Sequence[int] | np.ndarray, active: Sequence[bool] | np.ndarray | None = None) -> np.ndarray:
        """Feed ``tokens[s]`` (one per slot) to every active slot at once; return each slot's greedy
        next token, (slots,) int64 (meaningless for inactive slots). ``active`` defaults to every slot
        that holds something; a slot left out keeps its content and length."""
        ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if ids.shape[0] != self.slots:
            raise GenerationError(f"step takes one token per slot ({self.slots}), got {ids.shape[0]}.")
        mask = self.lengths > 0 if active is None else np.asarray(active, dtype=bool).reshape(-1)
        if mask.shape[0] != self.slots:
            raise GenerationError(f"active must have one flag per slot ({self.slots}), got {mask.shape[0]}.")
        if not mask.any():
            raise GenerationError("step has no active slot: prefill one first.")
        if np.any(self.lengths[mask] == 0):
            raise GenerationError(f"slots {np.flatnonzero(mask & (self.lengths == 0)).tolist()} are empty: prefill them first.")
        full = mask & (self.lengths >= self.capacity)
        if full.any():
            raise ContextOverflowError(f"slots {np.flatnonzero(full).tolist()} hold {self.capacity} tokens, the slot "
                                       "capacity; rewind them or end those streams.")
        if ids[mask].min() < 0 or ids[mask].max() >= self.manifest.vocab_size:
            raise GenerationError(f"Token ids must be in [0, {self.manifest.vocab_size}).")
        return self._step(ids, mask)

    def _step(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """``step`` once its arguments are checked; an active slot may be empty here (a one-token
        prompt of ``prefill_many`` starts at position 0)."""
        ids = np.where(mask, ids, 0)
        # Only slots 0..rows-1 run, rows a power of two covering the last active slot (slots are
        # taken lowest first, so one stream costs one row, not ``slots``).
        rows = min(self.slots, 1 << int(np.flatnonzero(mask)[-1]).bit_length())
        step = self._step_binding(rows)
        lengths = self.lengths[:rows]
        # Every slot writes at its own length: active ones advance past it, the others ignore it.
        step.ids.update_inplace(ids[:rows].reshape(-1, 1))
        step.positions.update_inplace(lengths.reshape(-1, 1).astype(np.int64))
        step.seqlens.update_inplace(lengths.astype(np.int32))
        bucket = -(-(int(lengths.max()) + 1) // LENGTH_BUCKET)  # 1, 2, ...: lengths + 1 in whole buckets
        self._total_host[...] = min(self._physical, bucket * LENGTH_BUCKET)  # the bound host value (never 1)
        graph = str(rows * 100_000 + bucket) if self.cuda_graph else SKIP_GRAPH  # one graph per (rows, bucket)
        try:
            self.session.run_with_iobinding(step.binding, self._run_options(graph))
        except Exception as exc:
            if not self.cuda_graph or graph in self._graphs_ran:
                raise GenerationError(f"The decode step failed: {exc}") from exc
            # A new graph's first runs (capture) failed: nothing was advanced, so run plainly from now on.
            self.cuda_graph, self.fallback_reason = False, f"capture failed: {str(exc).splitlines()[0][:200]}"
            log.warning("CUDA graph %s; decoding without it.", self.fallback_reason)
            self.session.run_with_iobinding(step.binding, self._run_options(SKIP_GRAPH))
        self._graphs_ran.add(graph)
        self._last_logits = step.logits
        self.lengths[mask] += 1
        out = np.zeros(self.slots, dtype=np.int64)
        out[:rows] = step.next.numpy().reshape(-1)
        return out

    def logits(self) -> np.ndarray:
        """The last run's logits as float32: (rows, vocab) after ``step`` (the first ``rows`` slots,
        every active one among them: index by slot), (1, vocab) after ``prefill``."""
        if self._last_logits is None:
            raise GenerationError("No step has run yet.")
        return self._last_logits.numpy().reshape(-1, self.manifest.vocab_size)

    @property
    def logits_value(self) -> ort.OrtValue:
        """The last run's logits where the session left them (on the GPU under CUDA), unconverted:
        (rows, 1, vocab) after ``step``; for work on the device (``topk.TopK.of_value``)."""
        if self._last_logits is None:
            raise GenerationError("No step has run yet.")
        return self._last_logits

    # --- snapshots ----------------------------------------------------------------------------------

    def snapshot(self, slot: int, n: int | None = None) -> SlotSnapshot:
        """A copy of the first ``n`` positions ``slot`` holds (default: all of them), on the decoder's
        device; ``restore`` writes it into an empty slot (a persona prefix read once, resumed every turn)."""
        self._check_slot(slot)
        held = int(self.lengths[slot])
        n = held if n is None else n
        if not isinstance(n, (int, np.integer)) or not 1 <= n <= held:
            raise GenerationError(f"A snapshot of slot {slot} takes 1..{held} positions (what it holds), got {n!r}.")
        return self.copier.take(int(slot), int(n))

    def restore(self, slot: int, snapshot: SlotSnapshot) -> None:
        """Fill the empty ``slot`` with ``snapshot``: it then holds ``snapshot.length`` tokens, and
        runs after them as after a prefill of the same tokens. The snapshot is not changed."""
        self._check_slot(slot)
        if self.lengths[slot]:
            raise GenerationError(f"slot {slot} holds {int(self.lengths[slot])} tokens: restore needs an empty slot.")
        if not isinstance(snapshot, SlotSnapshot) or not 1 <= snapshot.length <= self.capacity:
            raise GenerationError(f"restore needs a SlotSnapshot of 1..{self.capacity} positions.")
        self.copier.put(int(slot), snapshot)
        self.lengths[slot] = snapshot.length

    @property
    def copier(self) -> SlotCopier:
        """What copies snapshots in and out of the KV buffers (made at first use)."""
        if self._copier is None:
            self._copier = SlotCopier([*self._keys, *self._values], self._kv_arrays, np.dtype(self._kv_dtype), self.device,
                                      graph=self.copy_graphs)
        return self._copier

    def release(self, slot: int) -> None:
        """Empty ``slot`` (its stream ended); the next ``prefill`` there starts a new stream."""
        self.rewind(slot, 0)

    def rewind(self, slot: int, n: int) -> None:
        """Keep the first ``n`` tokens of ``slot`` (a persona prefix, say); later runs write after them."""
        self._check_slot(slot)
        if not 0 <= n <= self.lengths[slot]:
            raise GenerationError(f"Cannot rewind slot {slot} to {n} tokens: it holds {int(self.lengths[slot])}.")
        self.lengths[slot] = n

    def greedy(self, prompts: Sequence[Sequence[int]], new_tokens: int) -> list[list[int]]:
        """Prefill each prompt into its own slot (slots must be free), then decode ``new_tokens`` greedy
        tokens for all of them together; returns the new tokens per prompt (EOS does not stop them)."""
        if len(prompts) > self.slots or np.any(self.lengths[:len(prompts)] > 0):
            raise GenerationError(f"greedy needs {len(prompts)} free slots from slot 0 (the decoder has {self.slots}).")
        out = [[self.prefill(slot, prompt)] for slot, prompt in enumerate(prompts)]
        active = np.zeros(self.slots, dtype=bool)
        active[:len(prompts)] = True
        tokens = np.zeros(self.slots, dtype=np.int64)
        for _ in range(new_tokens - 1):
            tokens[:len(prompts)] = [row[-1] for row in out]
            nxt = self.step(tokens, active)
            for slot, row in enumerate(out):
                row.append(int(nxt[slot]))
        return out
