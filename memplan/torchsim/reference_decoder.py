"""A Llama-style decoder in plain torch, op for op like transformers' ``modeling_llama``.

Built from a :class:`memplan.specs.ModelSpec`: RMSNorm (fp32 upcast), rotary position
embeddings, grouped-query attention (SDPA or eager), SwiGLU MLP, tied or untied LM head, and
``labels`` -> shifted cross-entropy on fp32 logits. Module names match Hugging Face Llama
(``model.layers.0.self_attn.q_proj`` ... ``lm_head``) so LoRA targets and tracer labels are the
same. Used when transformers is absent, and by the tests as an independent implementation.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.nn import functional
from torch.utils.checkpoint import checkpoint

from memplan.specs import ModelSpec

IGNORE_INDEX = -100  # labels that do not count in the loss (transformers' ignore_index)


class RMSNorm(nn.Module):
    """y = w * (x / rms(x)), computed in fp32 and cast back (LlamaRMSNorm)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables of rotary embeddings for the positions of one batch."""

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        self.inv_freq: torch.Tensor
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        # transformers keeps the unscaled frequencies too (dynamic rope types rescale inv_freq).
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)
        self.attention_scaling = 1.0  # default rope: no scaling (transformers multiplies anyway)

    def forward(
        self, x: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(
            device=x.device, dtype=torch.float
        )
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def repeat_kv(hidden_states: torch.Tensor, num_groups: int) -> torch.Tensor:
    """(b, kv_heads, s, d) -> (b, kv_heads * num_groups, s, d), as eager attention does."""
    if num_groups == 1:
        return hidden_states
    b, kv_heads, s, d = hidden_states.shape
    expanded = hidden_states[:, :, None, :, :].expand(b, kv_heads, num_groups, s, d)
    return expanded.reshape(b, kv_heads * num_groups, s, d)


class Attention(nn.Module):
    """Grouped-query attention; eager when given a mask, SDPA (causal, no mask) otherwise."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        h, d = spec.hidden_size, spec.head_dim
        self.head_dim = d
        self.num_groups = spec.num_attention_heads // spec.num_key_value_heads
        self.scaling = d**-0.5
        self.attention_dropout = spec.attention_dropout
        bias, out_bias = spec.attention_bias, spec.attention_out_bias
        self.q_proj = nn.Linear(h, spec.num_attention_heads * d, bias=bias)
        self.k_proj = nn.Linear(h, spec.num_key_value_heads * d, bias=bias)
        self.v_proj = nn.Linear(h, spec.num_key_value_heads * d, bias=bias)
        self.o_proj = nn.Linear(spec.num_attention_heads * d, h, bias=out_bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        input_shape = hidden_states.shape[:-1]
        shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        query = (query * cos) + (rotate_half(query) * sin)
        key = (key * cos) + (rotate_half(key) * sin)
        dropout = self.attention_dropout if self.training else 0.0
        if mask is not None:
            out = self._eager(query, key, value, mask, dropout)
        else:
            out = self._sdpa(query, key, value, dropout)
        out = out.reshape(*input_shape, -1).contiguous()
        projected: torch.Tensor = self.o_proj(out)
        return projected

    def _sdpa(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout: float
    ) -> torch.Tensor:
        # transformers passes enable_gqa when there is no mask (sdpa_attention.use_gqa_in_sdpa).
        out = functional.scaled_dot_product_attention(
            query,
            key,
            value,
            dropout_p=dropout,
            scale=self.scaling,
            is_causal=query.shape[2] > 1,
            enable_gqa=self.num_groups > 1,
        )
        return out.transpose(1, 2).contiguous()

    def _eager(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor,
        dropout: float,
    ) -> torch.Tensor:
        key = repeat_kv(key, self.num_groups)
        value = repeat_kv(value, self.num_groups)
        scores = torch.matmul(query, key.transpose(2, 3)) * self.scaling
        scores = scores + mask
        probs = functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        probs = functional.dropout(probs, p=dropout, training=self.training)
        return torch.matmul(probs, value).transpose(1, 2).contiguous()


def causal_mask(batch: int, seq_len: int, like: torch.Tensor) -> torch.Tensor:
    """Additive (batch, 1, s, s) mask, 0 where a query may attend and dtype-min elsewhere.

    Built once per forward and shared by all layers, as transformers' create_causal_mask does
    for eager attention: a boolean (1, 1, s, s) comparison expanded over the batch, then where().
    """
    positions = torch.arange(seq_len, device=like.device)
    allowed = positions[None, None, None, :] <= positions[None, None, :, None]
    allowed = allowed.expand(batch, 1, seq_len, seq_len)
    zero = torch.zeros((), dtype=like.dtype, device=like.device)
    return torch.where(allowed, zero, torch.finfo(like.dtype).min)


class MLP(nn.Module):
    """SwiGLU: down(act(gate(x)) * up(x))."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        h, i = spec.hidden_size, spec.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=spec.mlp_bias)
        self.up_proj = nn.Linear(h, i, bias=spec.mlp_bias)
        self.down_proj = nn.Linear(i, h, bias=spec.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.down_proj(functional.silu(self.gate_proj(x)) * self.up_proj(x))
        return out


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.self_attn = Attention(spec)
        self.mlp = MLP(spec)
        self.input_layernorm = RMSNorm(spec.hidden_size)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size)
        self.gradient_checkpointing = False

    def forward(
        self,
        hidden_states: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            # As transformers' GradientCheckpointingLayer: checkpoint the body, keep the hooks
            # of __call__ outside; only the hidden state is a positional (saved) input, the
            # keyword inputs (position ids included) live in the recompute closure.
            body = partial(self._body, cos=cos, sin=sin, mask=mask, position_ids=position_ids)
            out: torch.Tensor = checkpoint(body, hidden_states, use_reentrant=False)
            return out
        return self._body(hidden_states, cos=cos, sin=sin, mask=mask, position_ids=position_ids)

    def _body(
        self,
        hidden_states: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.self_attn(self.input_layernorm(hidden_states), cos, sin, mask)
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
        return residual + hidden_states


class DecoderModel(nn.Module):
    """Embeddings, decoder layers and the final norm (``model.*`` in Hugging Face names)."""

    def __init__(self, spec: ModelSpec, implementation: str) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec) for _ in range(spec.num_decoder_layers))
        self.implementation = implementation
        self.norm = RMSNorm(spec.hidden_size)
        self.rotary_emb = RotaryEmbedding(spec.head_dim)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden_states = self.embed_tokens(input_ids)
        # + past_seen_tokens (0 without a cache): transformers' positions are a new tensor.
        position_ids = (torch.arange(input_ids.shape[1], device=input_ids.device) + 0).unsqueeze(0)
        batch, seq_len = input_ids.shape
        mask = (
            causal_mask(batch, seq_len, hidden_states) if self.implementation == "eager" else None
        )
        cos, sin = self.rotary_emb(hidden_states, position_ids)
        for layer in self.layers:
            hidden_states = layer(hidden_states, cos, sin, mask, position_ids)
        out: torch.Tensor = self.norm(hidden_states)
        return out


@dataclass
class DecoderOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor


class ReferenceDecoder(nn.Module):
    """Causal LM: ``forward(input_ids, labels)`` returns the loss and the logits."""

    def __init__(self, spec: ModelSpec, *, attention: str = "sdpa") -> None:
        super().__init__()
        if attention not in ("sdpa", "eager"):
            raise ValueError(f"attention must be 'sdpa' or 'eager', got {attention!r}")
        self.spec = spec
        self.model = DecoderModel(spec, attention)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        if spec.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._input_grad_hook: Any = None

    @property
    def is_gradient_checkpointing(self) -> bool:
        """Read by peft, which assumes checkpointing (input grads on) when it is missing."""
        return any(layer.gradient_checkpointing for layer in self.model.layers)

    def forward(
        self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, **_: Any
    ) -> DecoderOutput:
        logits = self.lm_head(self.model(input_ids))
        loss = None if labels is None else causal_lm_loss(logits, labels, self.spec.vocab_size)
        return DecoderOutput(loss=loss, logits=logits)

    def gradient_checkpointing_enable(self, every_n_layers: int = 1) -> None:
        """Checkpoint every n-th layer, and make the embeddings' output require grad so that
        checkpointed layers of a frozen base still propagate gradients (as transformers)."""
        for index, layer in enumerate(self.model.layers):
            assert isinstance(layer, DecoderLayer)
            layer.gradient_checkpointing = index % every_n_layers == 0
        self.enable_input_require_grads()

    def enable_input_require_grads(self) -> None:
        def require_grad(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            output.requires_grad_(True)

        self._input_grad_hook = self.model.embed_tokens.register_forward_hook(require_grad)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Mean cross-entropy of token t predicting t+1, on fp32 logits (ForCausalLMLoss)."""
    logits = logits.float()
    labels = functional.pad(labels, (0, 1), value=IGNORE_INDEX)
    shift_labels = labels[..., 1:].contiguous()
    flat_logits = logits.view(-1, vocab_size)
    return functional.cross_entropy(flat_logits, shift_labels.view(-1), ignore_index=IGNORE_INDEX)
