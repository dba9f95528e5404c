"""DeepSeek-V2 (transformers ``modeling_deepseek_v2``): Multi-head Latent Attention, a MoE MLP
with shared experts.

DeepseekV2Attention (MLA): the queries come from ``q_proj`` (or ``q_a_proj`` -> ``q_a_layernorm``
-> ``q_b_proj`` with ``q_lora_rank``), heads x (qk_nope + qk_rope) wide; ``kv_a_proj_with_mqa``
makes one latent (kv_lora_rank) plus one shared rotary key (qk_rope); ``kv_a_layernorm`` norms
the latent, ``kv_b_proj`` expands it into each head's unrotated key (qk_nope) and value
(v_head_dim). The rotary parts are rotated as complex numbers in fp32 (apply_rotary_emb), the
queries concatenated (torch.cat), the keys written into a new tensor (new_empty + two copy_);
the attention reads q/k of qk_nope + qk_rope and v of v_head_dim; ``o_proj`` maps heads x
v_head_dim back.

DeepseekV2Moe: a router (``mlp.gate``, DeepseekV2TopkRouter: fp32 F.linear of the fp32-cast
input with its weight, kept fp32 by ``_keep_in_fp32_modules_strict``; softmax; greedy top-k;
times routed_scaling_factor), the routed experts as two 3-D parameters run by transformers'
grouped_mm experts implementation, and a dense shared-expert MLP of
moe_intermediate_size x n_shared_experts added to their output. The first
``first_k_dense_replace`` layers run a dense DeepseekV2MLP of ``intermediate_size``.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from pydantic import Field, NonNegativeInt, PositiveInt

from memplan.families import _config as cfg
from memplan.families.base import Config, Layout
from memplan.families.llama import Llama

if TYPE_CHECKING:
    from memplan.analytic.context import StepContext
    from memplan.analytic.graph import Segment, Tensor
    from memplan.analytic.layers import LayerGraph
    from memplan.analytic.model_graph import StackBuilder, Stacks
    from memplan.architecture import Block
    from memplan.specs.model import ModelSpec

# DeepseekV2Config defaults.
_DEFAULT_Q_LORA = 1536  # q_lora_rank
_DEFAULT_KV_LORA = 512  # kv_lora_rank
_DEFAULT_NOPE = 128  # qk_nope_head_dim
_DEFAULT_ROPE = 64  # qk_rope_head_dim
_DEFAULT_V = 128  # v_head_dim
_DEFAULT_EXPERTS = 64  # n_routed_experts
_DEFAULT_SHARED = 2  # n_shared_experts
_DEFAULT_MOE_FFN = 1407  # moe_intermediate_size


class DeepseekV2Layout(Layout):
    q_lora_rank: PositiveInt | None = Field(
        default=None, description="Width of the query latent (None: one q_proj)."
    )
    kv_lora_rank: PositiveInt = Field(default=_DEFAULT_KV_LORA, description="Key/value latent.")
    qk_nope_head_dim: PositiveInt = Field(default=_DEFAULT_NOPE, description="Unrotated q/k.")
    qk_rope_head_dim: PositiveInt = Field(default=_DEFAULT_ROPE, description="Rotated q/k.")
    v_head_dim: PositiveInt = Field(default=_DEFAULT_V, description="Width of a value head.")
    moe_intermediate_size: PositiveInt = Field(
        default=_DEFAULT_MOE_FFN, description="Width of one routed expert."
    )
    n_shared_experts: NonNegativeInt = Field(
        default=_DEFAULT_SHARED, description="Shared experts (one dense MLP of their total width)."
    )
    first_k_dense_replace: NonNegativeInt = Field(
        default=0, description="Leading layers with a dense MLP instead of the MoE block."
    )
    routed_scaling_factor: float = Field(default=1.0, description="Top-k weights' scale.")


class DeepseekV2(Llama):
    name = "deepseek_v2"
    model_types = ("deepseek_v2",)
    tiny_model = "tiny-deepseek_v2"
    hf_model_class = "DeepseekV2ForCausalLM"
    layout_type = DeepseekV2Layout
    default_max_positions = 2048
    # peft maps deepseek_v2 to qwen2_moe's conversion pattern: gate_proj/up_proj name the
    # experts' 3-D gate_up_proj, down_proj their down_proj, gate the router (lora.ParamWrapper).
    lora_expert_roles = ("gate", "up", "down", "router")

    def layout(self, spec: ModelSpec) -> DeepseekV2Layout:
        assert isinstance(spec.layout, DeepseekV2Layout)
        return spec.layout

    def read_config(self, config: Config) -> dict[str, Any]:
        method = cfg.text(config, "topk_method", "greedy")
        if method != "greedy":
            raise ValueError(f"deepseek_v2: topk_method {method!r} is not modeled (greedy only)")
        fields = super().read_config(config)
        nope = cfg.integer(config, "qk_nope_head_dim", _DEFAULT_NOPE)
        rope = cfg.integer(config, "qk_rope_head_dim", _DEFAULT_ROPE)
        # The attention's q/k heads are qk_nope + qk_rope wide (qk_head_dim); KV heads: one per
        # query head after kv_b_proj.
        fields["head_dim"] = nope + rope
        fields["num_key_value_heads"] = fields["num_attention_heads"]
        fields["num_experts"] = cfg.integer(config, "n_routed_experts", _DEFAULT_EXPERTS)
        top_k = config.get("num_experts_per_tok")
        fields["num_experts_per_token"] = (
            0 if top_k is None else cfg.integer(config, "num_experts_per_tok")
        )
        if fields["num_experts"] and not fields["num_experts_per_token"]:
            raise ValueError("deepseek_v2: num_experts_per_tok is required with routed experts")
        q_lora = config.get("q_lora_rank", _DEFAULT_Q_LORA)
        fields["layout"] = {
            "q_lora_rank": None
            if q_lora is None
            else cfg.integer(config, "q_lora_rank", _DEFAULT_Q_LORA),
            "kv_lora_rank": cfg.integer(config, "kv_lora_rank", _DEFAULT_KV_LORA),
            "qk_nope_head_dim": nope,
            "qk_rope_head_dim": rope,
            "v_head_dim": cfg.integer(config, "v_head_dim", _DEFAULT_V),
            "moe_intermediate_size": cfg.integer(config, "moe_intermediate_size", _DEFAULT_MOE_FFN),
            "n_shared_experts": cfg.integer(config, "n_shared_experts", _DEFAULT_SHARED, minimum=0),
            "first_k_dense_replace": min(
                cfg.integer(config, "first_k_dense_replace", 0, minimum=0),
                fields["num_decoder_layers"],
            ),
            "routed_scaling_factor": float(config.get("routed_scaling_factor", 1.0)),
        }
        return fields

    def unsupported(self, spec: ModelSpec, method: str) -> str | None:
        if method == "prefix":
            return (
                "method=prefix cannot run on DeepSeek-V2: its cache holds one compressed latent "
                "per token, and peft's per-head prefix keys/values do not concatenate to it"
            )
        return None

    def rotary_dim(self, spec: ModelSpec) -> int:
        # DeepseekV2Config.__post_init__ sets head_dim = qk_rope_head_dim: inv_freq's width.
        return self.layout(spec).qk_rope_head_dim

    # -- parameters ---------------------------------------------------------------------------
    def blocks(self, spec: ModelSpec) -> tuple[Block, ...]:
        from memplan.architecture import (
            Block,
            lm_head_blocks,
            norm_params,
            token_embedding_param,
        )

        h = spec.hidden_size
        lay = self.layout(spec)
        dense = lay.first_k_dense_replace
        common = [
            *self.attention_params(spec),
            *norm_params("input_layernorm", h, with_bias=False),
            *norm_params("post_attention_layernorm", h, with_bias=False),
        ]
        dense_layer = [*common, *self.dense_mlp_params(spec)]
        moe_layer = [*common, *self.moe_params(spec)]
        layers = []
        if dense:
            layers.append(Block("decoder_layer", tuple(dense_layer), repeat=dense))
        if spec.num_decoder_layers > dense:
            layers.append(
                Block("decoder_layer", tuple(moe_layer), repeat=spec.num_decoder_layers - dense)
            )
        return (
            Block("embeddings", (token_embedding_param("embed_tokens", spec),)),
            *layers,
            Block("final_norm", tuple(norm_params("norm", h, with_bias=False))),
            *lm_head_blocks(spec),
        )

    def attention_params(self, spec: ModelSpec) -> list[Any]:
        from memplan.architecture import linear_params, norm_params

        h, heads = spec.hidden_size, spec.num_attention_heads
        lay = self.layout(spec)
        qk, rope, v = spec.head_dim, lay.qk_rope_head_dim, lay.v_head_dim
        bias = spec.attention_bias
        p = "self_attn."
        if lay.q_lora_rank is None:
            q = linear_params(p + "q_proj", heads * qk, h, "q", bias=False)
        else:
            q = [
                # q_a_proj compresses the queries (bias: attention_bias); no LoRA role.
                *linear_params(p + "q_a_proj", lay.q_lora_rank, h, None, bias=bias),
                *norm_params(p + "q_a_layernorm", lay.q_lora_rank, with_bias=False),
                *linear_params(p + "q_b_proj", heads * qk, lay.q_lora_rank, "q", bias=False),
            ]
        # kv_a_proj_with_mqa: the key/value latent plus the shared rotary key ("k"), replicated
        # under tensor parallelism (every head's kv_b_proj reads the whole latent).
        latent = lay.kv_lora_rank + rope
        kv_a = [
            dataclasses.replace(t, tp_split=False)
            for t in linear_params(p + "kv_a_proj_with_mqa", latent, h, "k", bias=bias)
        ]
        return [
            *q,
            *kv_a,
            *norm_params(p + "kv_a_layernorm", lay.kv_lora_rank, with_bias=False),
            # kv_b_proj: each head's unrotated key and its value ("v").
            *linear_params(
                p + "kv_b_proj",
                heads * (lay.qk_nope_head_dim + v),
                lay.kv_lora_rank,
                "v",
                bias=False,
            ),
            *linear_params(p + "o_proj", h, heads * v, "o", bias=bias),
        ]

    def dense_mlp_params(self, spec: ModelSpec, prefix: str = "mlp.") -> list[Any]:
        from memplan.architecture import gated_mlp_params

        return gated_mlp_params(spec, prefix, ("gate_proj", "up_proj", "down_proj"))

    def moe_params(self, spec: ModelSpec) -> list[Any]:
        from memplan.architecture import ParamKind, ParamTensor, linear_params

        h, e = spec.hidden_size, spec.num_experts
        lay = self.layout(spec)
        i = lay.moe_intermediate_size
        shared = i * lay.n_shared_experts
        return [
            # DeepseekV2TopkRouter.weight: (experts, hidden), kept fp32 by the model.
            ParamTensor("mlp.gate.weight", (e, h), ParamKind.ROUTER, "router", keep_fp32=True),
            ParamTensor(
                "mlp.experts.gate_up_proj", (2 * i, h), ParamKind.LINEAR, "gate_up", copies=e
            ),
            ParamTensor("mlp.experts.down_proj", (h, i), ParamKind.LINEAR, "down", copies=e),
            *linear_params("mlp.shared_experts.gate_proj", shared, h, "gate", bias=spec.mlp_bias),
            *linear_params("mlp.shared_experts.up_proj", shared, h, "up", bias=spec.mlp_bias),
            *linear_params("mlp.shared_experts.down_proj", h, shared, "down", bias=spec.mlp_bias),
        ]

    # -- the step ------------------------------------------------------------------------------
    def stacks(self, spec: ModelSpec, ctx: StepContext, build: StackBuilder) -> Stacks:
        """One stack: first_k_dense_replace dense layers, then MoE layers."""
        from memplan.analytic.model_graph import LayerPlan

        dense = self.layout(spec).first_k_dense_replace
        stacks = build.single(spec, ctx, self.layer, spec.num_layers)
        stack = stacks.stacks[0]
        graphs: dict[tuple[bool, bool], LayerGraph] = {}
        rg = stack.embed_out.requires_grad
        plans = []
        for i, plan in enumerate(stack.layers):
            key = (i >= dense and spec.num_experts > 0, rg)
            if key not in graphs:
                graphs[key] = self.layer(spec, ctx, input_requires_grad=rg, moe=key[0])
            graph = graphs[key]
            plans.append(LayerPlan(graph, plan.checkpointed))
            rg = graph.output.requires_grad
        stack.layers = plans
        return stacks

    def layer(
        self, spec: ModelSpec, ctx: StepContext, *, input_requires_grad: bool, moe: bool = True
    ) -> LayerGraph:
        """DeepseekV2DecoderLayer: pre-RMSNorm MLA attention + dense MLP or MoE block."""
        from memplan.analytic.blocks import residual_add, rms_norm
        from memplan.analytic.graph import Segment
        from memplan.analytic.layers import LayerGraph, gated_mlp
        from memplan.dtypes import DType

        seg = Segment("layer")
        h, n = spec.hidden_size, ctx.num_tokens
        lay = self.layout(spec)
        x = seg.input(n * h, ctx.activation_dtype, "layer.input", requires_grad=input_requires_grad)
        # DeepseekV2RotaryEmbedding: one complex64 freqs_cis (seq, qk_rope / 2) per forward.
        freqs = seg.input(
            ctx.seq_len * lay.qk_rope_head_dim,
            DType.FP32,
            "rope.freqs_cis",
            requires_grad=False,
            persistent=True,
        )
        hn = rms_norm(seg, ctx, x, "input_layernorm", h)
        o = self._attention(seg, ctx, spec, hn, freqs)
        o = ctx.method.branch_output(seg, ctx, o, "adapter_attn")
        seg.hold(hn)  # `hidden_states` names the norm output until self_attn returns
        h1 = residual_add(seg, x, o, "residual_attn")
        hn2 = rms_norm(seg, ctx, h1, "post_attention_layernorm", h)
        if moe:
            m = self._moe(seg, ctx, spec, hn2)
        else:
            tp = ctx.tensor_parallel_degree
            m = gated_mlp(seg, ctx, spec, hn2, intermediate=spec.intermediate_size // tp)
        m = ctx.method.branch_output(seg, ctx, m, "adapter_mlp")
        seg.hold(hn2)  # ... and the second norm's output until the MLP returns
        out = residual_add(seg, h1, m, "residual_mlp")
        seg.hold(x)  # the caller's `hidden_states` keeps the layer input until the layer returns
        return LayerGraph(seg, x, out, (freqs,))

    def _attention(
        self, seg: Segment, ctx: StepContext, spec: ModelSpec, hn: Tensor, freqs: Tensor
    ) -> Tensor:
        """DeepseekV2Attention (MLA) up to and including o_proj."""
        from memplan.analytic.blocks import LinearSpec, linear, rms_norm
        from memplan.analytic.layers import attention_context

        h, n = spec.hidden_size, ctx.num_tokens
        heads = spec.num_attention_heads // ctx.tensor_parallel_degree  # this GPU's heads
        lay = self.layout(spec)
        nope, rope, vd, kvr = (
            lay.qk_nope_head_dim,
            lay.qk_rope_head_dim,
            lay.v_head_dim,
            lay.kv_lora_rank,
        )
        qk = nope + rope
        bias = spec.attention_bias
        if lay.q_lora_rank is None:
            q = linear(seg, ctx, hn, LinearSpec("self_attn.q_proj", h, heads * qk, "q", bias=False))
        else:
            r = lay.q_lora_rank
            qa = linear(seg, ctx, hn, LinearSpec("self_attn.q_a_proj", h, r, None, bias=bias))
            qa = rms_norm(seg, ctx, qa, "self_attn.q_a_layernorm", r)
            q_b = LinearSpec("self_attn.q_b_proj", r, heads * qk, "q", bias=False)
            q = linear(seg, ctx, qa, q_b)
        # torch.split of the (batch, heads, seq, qk) view: two strided views of q.
        q_nope = _view(seg, q, n * heads * nope, "self_attn.q_nope")
        q_pe = _view(seg, q, n * heads * rope, "self_attn.q_pe")
        ckv = linear(
            seg,
            ctx,
            hn,
            LinearSpec("self_attn.kv_a_proj_with_mqa", h, kvr + rope, "k", bias=bias),
        )
        kv_nope = _view(seg, ckv, n * kvr, "self_attn.kv_nope")
        k_pe = _view(seg, ckv, n * rope, "self_attn.k_pe")
        latent = rms_norm(seg, ctx, kv_nope, "self_attn.kv_a_layernorm", kvr)
        q_pe = _complex_rotary(seg, q_pe, freqs, "self_attn.q_rope")
        k_pe = _complex_rotary(seg, k_pe, freqs, "self_attn.k_rope")
        # torch.cat((q_nope, q_pe)): the queries, a new (batch, heads, seq, qk) tensor.
        query = seg.op(
            "self_attn.query_cat", [q_nope, q_pe], n * heads * qk, q.dtype, passthrough_grad=True
        )
        kv = linear(
            seg,
            ctx,
            latent,
            LinearSpec("self_attn.kv_b_proj", kvr, heads * (nope + vd), "v", bias=False),
        )
        k_nope = _view(seg, kv, n * heads * nope, "self_attn.k_nope")
        value = _view(seg, kv, n * heads * vd, "self_attn.value")
        # expand_kv: new_empty keys, k_nope and the head-expanded rotary key copied in (copy_).
        key = seg.op(
            "self_attn.key_states",
            [k_nope, k_pe],
            n * heads * qk,
            kv.dtype,
            passthrough_grad=True,
        )
        context = attention_context(
            seg,
            ctx,
            spec,
            (query, key, value),
            heads=heads,
            kv_heads=heads,
            label="self_attn",
            dropout_p=spec.attention_dropout,
            head_major_q=True,
            context_numel=n * heads * vd,  # values of v_head_dim
        )
        out = linear(
            seg, ctx, context, LinearSpec("self_attn.o_proj", heads * vd, h, "o", bias=bias)
        )
        # DeepseekV2Attention.forward's locals (q, compressed_kv, the rotated q_pe and k_pe,
        # query_states, kv, key_states) live until it returns; a checkpoint's recomputation
        # that stops inside the attention holds them until it stops.
        seg.hold(q, ckv, q_pe, k_pe, query, kv, key, label="self_attn.locals")
        return out

    def _moe(self, seg: Segment, ctx: StepContext, spec: ModelSpec, x: Tensor) -> Tensor:
        """DeepseekV2Moe: routed experts (grouped_mm) plus the shared-expert MLP."""
        from memplan.analytic.blocks import residual_add
        from memplan.analytic.layers import gated_mlp, moe_mlp

        lay = self.layout(spec)
        moe_spec = spec.model_copy(update={"intermediate_size": lay.moe_intermediate_size})
        # DeepseekV2TopkRouter: fp32 router, greedy top-k of the softmax (no renormalization),
        # times routed_scaling_factor; the experts' grouped_mm implementation.
        routed = moe_mlp(seg, ctx, moe_spec, x, renormalize=False, fp32_router=True, scaled=True)
        shared = lay.moe_intermediate_size * lay.n_shared_experts // ctx.tensor_parallel_degree
        # shared_experts(residuals): a DeepseekV2MLP of n_shared_experts x moe width.
        s = gated_mlp(seg, ctx, spec, x, intermediate=shared, prefix="mlp.shared_experts.")
        return residual_add(seg, routed, s, "mlp.shared_add")


def _view(seg: Segment, x: Tensor, numel: int, label: str) -> Tensor:
    """A view of part of ``x`` (split, slice); its gradient flows into x's."""
    return seg.op(label, [x], numel, x.dtype, view_of=x, passthrough_grad=True)


def _complex_rotary(seg: Segment, x: Tensor, freqs: Tensor, label: str) -> Tensor:
    """apply_rotary_emb: x.float() viewed as complex, times freqs_cis (complex64, the only
    tensor the product saves), back to real and .type_as(x)."""
    from memplan.analytic.blocks import cast
    from memplan.dtypes import DType

    xf = cast(seg, x, DType.FP32, f"{label}.float")
    prod = seg.op(f"{label}.mul", [xf], x.numel, DType.FP32, saves=[freqs])
    return cast(seg, prod, x.dtype, f"{label}.type_as")


FAMILY = DeepseekV2()
