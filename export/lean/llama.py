"""The lean Llama-family decoder (SmolLM2, TinyLlama): fourteen fused nodes per layer (eleven in the
slots layout).

One layer, shapes (batch, seq, ·)::

    SkipSimplifiedLayerNormalization(prev MLP out, residual)  → x, residual   (layer 0: RMSNorm of the embedding)
    MatMul                       x @ [q | k | v]              → (batch, seq, (heads + 2 kv_heads) * head_dim)
    Split                                                     → q, k, v
    RotaryEmbedding(q), RotaryEmbedding(k)                    positions from position_ids (left padding exact)
    GroupQueryAttention(q, k, v, past)                        → attn, present.{i}.key/value (kv_heads kept)
      slots layout: GroupQueryAttention(packed qkv, past, do_rotary) instead of these four nodes: every
      row's keys start at position 0 there, so the kernel's own positions (from seqlens_k: the
      row's length before the new tokens) are the model's, and three launches a layer go
    MatMul                       attn @ o_proj
    SkipSimplifiedLayerNormalization(attn, residual)          → x, residual
    MatMul x @ [gate | up] → Split → Sigmoid, Mul, Mul (silu(gate) * up) → MatMul (down_proj)

Weights are transposed once here to (in, out) so every linear layer is a plain MatMul (what the
int8 and int4 quantizers look for); node names follow optimum's (``/model/layers.{i}/mlp/down_proj/MatMul``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from npctalk.engine.errors import UnsupportedModelError

from .graph import MS, GraphBuilder, attention, declare_outputs, decoder_inputs, last_position, lm_head, numpy

_ROPE_TYPES = ("default", "linear", "llama3")  # position-independent inverse frequencies (a fixed cos/sin table)


def check_supported(config: Any) -> None:
    """Raise ``UnsupportedModelError`` for Llama variants this graph would compute differently."""
    problems = []
    if config.hidden_act != "silu":
        problems.append(f"hidden_act {config.hidden_act!r} (supported: 'silu')")
    rope = (getattr(config, "rope_scaling", None) or {}).get("rope_type", "default")
    if rope not in _ROPE_TYPES:
        problems.append(f"rope_scaling type {rope!r} (supported: {', '.join(_ROPE_TYPES)})")
    if config.num_attention_heads % config.num_key_value_heads:
        problems.append(f"{config.num_attention_heads} heads do not split into {config.num_key_value_heads} KV groups")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim % 8:
        problems.append(f"head_dim {head_dim} (GroupQueryAttention needs a multiple of 8)")
    if getattr(config, "sliding_window", None):
        problems.append("sliding-window attention")
    if problems:
        raise UnsupportedModelError(
            "The lean graph does not support this Llama variant: " + "; ".join(problems) + ". Export it with --graph optimum."
        )


def rotary_tables(model: Any, max_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin (max_positions, head_dim / 2) float32, exactly as transformers computes them per position."""
    rotary = model.model.rotary_emb
    inv_freq = rotary.inv_freq.detach().float().numpy()                                 # (head_dim / 2,)
    freqs = np.arange(max_positions, dtype=np.float32)[:, None] * inv_freq[None, :]
    scaling = np.float32(getattr(rotary, "attention_scaling", 1.0))
    return np.cos(freqs) * scaling, np.sin(freqs) * scaling


def build(model: Any, b: GraphBuilder, io: dict[str, Any], untie_lm_head: bool = False,
          layout: str = "mask") -> None:
    """Write ``model`` (a transformers ``LlamaForCausalLM``, fp32) into ``b``."""
    config = model.config
    check_supported(config)
    layers, heads, kv_heads = config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    eps = float(config.rms_norm_eps)
    inputs = decoder_inputs(b, io, layers, kv_heads, head_dim, layout)
    embed_tokens = model.model.embed_tokens
    tied = model.lm_head.weight.data_ptr() == embed_tokens.weight.data_ptr() and not untie_lm_head

    cos, sin = rotary_tables(model, config.max_position_embeddings)
    cos_cache, sin_cache = b.weight("rotary.cos_cache", cos), b.weight("rotary.sin_cache", sin)
    embed = b.weight("model.embed_tokens.weight", numpy(embed_tokens.weight))             # (vocab, hidden)
    hidden = b.one("Gather", [embed, inputs.input_ids], "/model/embed_tokens/Gather")    # (batch, seq, hidden)
    split_qkv = "" if layout == "slots" else b.const(  # the slots layout hands the packed qkv to the attention
        "/model/split_qkv", np.array([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], np.int64))
    stream, residual = hidden, None
    for i, layer in enumerate(model.model.layers):
        p, w, att, mlp = f"/model/layers.{i}", f"model.layers.{i}", layer.self_attn, layer.mlp
        x, residual = _rms_norm(b, f"{p}/input_layernorm", stream, residual, layer.input_layernorm, f"{w}.input_layernorm", eps)
        qkv_w = np.concatenate([numpy(att.q_proj.weight).T, numpy(att.k_proj.weight).T, numpy(att.v_proj.weight).T], axis=1)
        qkv = b.one("MatMul", [x, b.weight(f"{w}.self_attn.qkv_proj.weight", qkv_w)], f"{p}/self_attn/qkv_proj/MatMul")
        if att.q_proj.bias is not None:
            qkv_b = np.concatenate([numpy(att.q_proj.bias), numpy(att.k_proj.bias), numpy(att.v_proj.bias)])
            qkv = b.one("Add", [qkv, b.weight(f"{w}.self_attn.qkv_proj.bias", qkv_b)], f"{p}/self_attn/qkv_proj/Add")
        if layout == "slots":  # the kernel rotates q and k itself, at positions it reads from seqlens_k
            attn = attention(b, f"{p}/self_attn", i, io, inputs, [qkv], heads, kv_heads, float(att.scaling),
                             rotary=(cos_cache, sin_cache))
        else:
            q, k, v = b.node("Split", [qkv, split_qkv], f"{p}/self_attn/Split", 3, axis=-1)
            q = b.one("RotaryEmbedding", [q, inputs.position_ids, cos_cache, sin_cache], f"{p}/self_attn/q_rotary", MS,
                      num_heads=heads)
            k = b.one("RotaryEmbedding", [k, inputs.position_ids, cos_cache, sin_cache], f"{p}/self_attn/k_rotary", MS,
                      num_heads=kv_heads)
            attn = attention(b, f"{p}/self_attn", i, io, inputs, [q, k, v], heads, kv_heads, float(att.scaling))
        out = _linear(b, f"{p}/self_attn/o_proj", attn, att.o_proj, f"{w}.self_attn.o_proj")
        x, residual = _rms_norm(b, f"{p}/post_attention_layernorm", out, residual, layer.post_attention_layernorm,
                                f"{w}.post_attention_layernorm", eps)
        gate_up_w = np.concatenate([numpy(mlp.gate_proj.weight).T, numpy(mlp.up_proj.weight).T], axis=1)
        gate_up = b.one("MatMul", [x, b.weight(f"{w}.mlp.gate_up_proj.weight", gate_up_w)], f"{p}/mlp/gate_up_proj/MatMul")
        if mlp.gate_proj.bias is not None:
            gate_up_b = np.concatenate([numpy(mlp.gate_proj.bias), numpy(mlp.up_proj.bias)])
            gate_up = b.one("Add", [gate_up, b.weight(f"{w}.mlp.gate_up_proj.bias", gate_up_b)], f"{p}/mlp/gate_up_proj/Add")
        gate, up = b.node("Split", [gate_up], f"{p}/mlp/Split", 2, axis=-1, num_outputs=2)
        silu = b.one("Mul", [gate, b.one("Sigmoid", [gate], f"{p}/mlp/act_fn/Sigmoid")], f"{p}/mlp/act_fn/Mul")
        h = b.one("Mul", [silu, up], f"{p}/mlp/Mul")
        stream = _linear(b, f"{p}/mlp/down_proj", h, mlp.down_proj, f"{w}.mlp.down_proj")
    x, _ = _rms_norm(b, "/model/norm", stream, residual, model.model.norm, "model.norm", eps)
    last = last_position(b, x)                                                             # (batch, 1, hidden)
    lm_head(b, last, io, embed if tied else None, None if tied else numpy(model.lm_head.weight).T)
    declare_outputs(b, io, layers, kv_heads, head_dim, config.vocab_size, layout)


def _linear(b: GraphBuilder, name: str, x: str, linear: Any, weight: str) -> str:
    """x @ W.T (+ bias) as MatMul (+ Add), the weight stored (in, out)."""
    y = b.one("MatMul", [x, b.weight(f"{weight}.weight", numpy(linear.weight).T)], f"{name}/MatMul")
    if linear.bias is not None:
        y = b.one("Add", [y, b.weight(f"{weight}.bias", numpy(linear.bias))], f"{name}/Add")
    return y


def _rms_norm(b: GraphBuilder, name: str, stream: str, residual: str | None, norm: Any, weight: str,
              eps: float) -> tuple[str, str]:
    """RMSNorm(stream (+ residual)) → (normalized, the new residual stream)."""
    gamma = b.weight(f"{weight}.weight", numpy(norm.weight))
    if residual is None:
        return b.one("SimplifiedLayerNormalization", [stream, gamma], f"{name}/SimplifiedLayerNormalization",
                     axis=-1, epsilon=eps, stash_type=1), stream
    normed, _, _, total = b.node("SkipSimplifiedLayerNormalization", [stream, residual, gamma],
                                 f"{name}/SkipSimplifiedLayerNormalization",
                                 [f"{name}/output_0", "", "", f"{name}/output_3"], MS, epsilon=eps)
    return normed, total
