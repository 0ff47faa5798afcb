"""The lean GPT-2 / DialoGPT decoder: nine fused nodes per layer, written from the PyTorch weights.

One layer, shapes (batch, seq, ·)::

    SkipLayerNormalization(prev MLP out + its bias, residual)  → x, residual   (layer 0: wte + wpe)
    MatMul + Add                      x @ c_attn               → packed qkv    (batch, seq, 3 * hidden)
    GroupQueryAttention(qkv, past)                             → attn, present.{i}.key/value
    MatMul                            attn @ c_proj            (its bias goes into the next SkipLayerNorm)
    SkipLayerNormalization(attn + bias, residual)              → x, residual
    MatMul → FastGelu(+ c_fc bias) → MatMul (c_proj; bias into the next SkipLayerNorm)

GPT-2's ``Conv1D`` weights are already (in, out), so every linear layer is a plain MatMul the
quantizers recognise; node names follow optimum's (``/transformer/h.{i}/mlp/c_proj/MatMul``) so
``optimize.KEEP_FP32_NODES`` finds the MLP down projections.
"""

from __future__ import annotations

from typing import Any

from npctalk.engine.errors import UnsupportedModelError

from .graph import GraphBuilder, attention, declare_outputs, decoder_inputs, last_position, lm_head, numpy

# transformers' activation names → the ONNX Runtime op that computes it with the bias fused in.
_ACTIVATIONS = {"gelu_new": "FastGelu", "gelu_pytorch_tanh": "FastGelu", "gelu_fast": "FastGelu", "gelu": "BiasGelu"}


def check_supported(config: Any) -> None:
    """Raise ``UnsupportedModelError`` for GPT-2 variants this graph would compute differently."""
    problems = []
    if config.activation_function not in _ACTIVATIONS:
        problems.append(f"activation_function {config.activation_function!r} (supported: {sorted(_ACTIVATIONS)})")
    if (config.n_embd // config.n_head) % 8:
        problems.append(f"head_dim {config.n_embd // config.n_head} (GroupQueryAttention needs a multiple of 8)")
    for flag, want in (("scale_attn_by_inverse_layer_idx", False), ("reorder_and_upcast_attn", False),
                       ("add_cross_attention", False)):
        if getattr(config, flag, want) != want:
            problems.append(f"{flag}={getattr(config, flag)}")
    if problems:
        raise UnsupportedModelError(
            "The lean graph does not support this GPT-2 variant: " + "; ".join(problems) + ". Export it with --graph optimum."
        )


def build(model: Any, b: GraphBuilder, io: dict[str, Any], untie_lm_head: bool = False,
          layout: str = "mask") -> None:
    """Write ``model`` (a transformers ``GPT2LMHeadModel``, fp32) into ``b``."""
    config = model.config
    check_supported(config)
    tr = model.transformer
    layers, heads, hidden = config.n_layer, config.n_head, config.n_embd
    head_dim, eps = hidden // heads, float(config.layer_norm_epsilon)
    scale = 1.0 / head_dim ** 0.5 if getattr(config, "scale_attn_weights", True) else 1.0
    act = _ACTIVATIONS[config.activation_function]
    inputs = decoder_inputs(b, io, layers, heads, head_dim, layout)
    tied = model.lm_head.weight.data_ptr() == tr.wte.weight.data_ptr() and not untie_lm_head

    wte = b.weight("transformer.wte.weight", numpy(tr.wte.weight))                    # (vocab, hidden)
    tokens = b.one("Gather", [wte, inputs.input_ids], "/transformer/wte/Gather")          # (batch, seq, hidden)
    pos = b.one("Gather", [b.weight("transformer.wpe.weight", numpy(tr.wpe.weight)), inputs.position_ids],
                "/transformer/wpe/Gather")
    stream, skip, skip_bias = tokens, pos, None  # the next SkipLayerNorm adds stream + skip (+ skip_bias)
    for i, block in enumerate(tr.h):
        p, w = f"/transformer/h.{i}", f"transformer.h.{i}"
        x, residual = _skip_norm(b, f"{p}/ln_1", stream, skip, skip_bias, block.ln_1, f"{w}.ln_1", eps)
        qkv = b.one("MatMul", [x, b.weight(f"{w}.attn.c_attn.weight", numpy(block.attn.c_attn.weight))],
                    f"{p}/attn/c_attn/MatMul")                                             # (batch, seq, 3 * hidden)
        qkv = b.one("Add", [qkv, b.weight(f"{w}.attn.c_attn.bias", numpy(block.attn.c_attn.bias))], f"{p}/attn/c_attn/Add")
        attn = attention(b, p, i, io, inputs, [qkv], heads, heads, scale)
        out = b.one("MatMul", [attn, b.weight(f"{w}.attn.c_proj.weight", numpy(block.attn.c_proj.weight))],
                    f"{p}/attn/c_proj/MatMul")
        x, residual = _skip_norm(b, f"{p}/ln_2", out, residual, numpy(block.attn.c_proj.bias), block.ln_2, f"{w}.ln_2", eps)
        h = b.one("MatMul", [x, b.weight(f"{w}.mlp.c_fc.weight", numpy(block.mlp.c_fc.weight))], f"{p}/mlp/c_fc/MatMul")
        h = b.one(act, [h, b.weight(f"{w}.mlp.c_fc.bias", numpy(block.mlp.c_fc.bias))], f"{p}/mlp/act/{act}", "com.microsoft")
        down = b.one("MatMul", [h, b.weight(f"{w}.mlp.c_proj.weight", numpy(block.mlp.c_proj.weight))],
                     f"{p}/mlp/c_proj/MatMul")
        stream, skip, skip_bias = down, residual, numpy(block.mlp.c_proj.bias)
    x, _ = _skip_norm(b, "/transformer/ln_f", stream, skip, skip_bias, tr.ln_f, "transformer.ln_f", eps)
    last = last_position(b, x)                                                             # (batch, 1, hidden)
    lm_head(b, last, io, wte if tied else None, None if tied else numpy(model.lm_head.weight).T)
    declare_outputs(b, io, layers, heads, head_dim, config.vocab_size, layout)


def _skip_norm(b: GraphBuilder, name: str, stream: str, skip: str, bias: Any, ln: Any, weight: str,
               eps: float) -> tuple[str, str]:
    """LayerNorm(stream + skip (+ bias)) → (normalized, the sum: the new residual stream)."""
    inputs = [stream, skip, b.weight(f"{weight}.weight", numpy(ln.weight)), b.weight(f"{weight}.bias", numpy(ln.bias))]
    if bias is not None:
        inputs.append(b.weight(f"{name}/skip_bias", bias))
    normed, _, _, total = b.node("SkipLayerNormalization", inputs, f"{name}/SkipLayerNormalization",
                                 [f"{name}/output_0", "", "", f"{name}/output_3"],
                                 "com.microsoft", epsilon=eps)
    return normed, total
