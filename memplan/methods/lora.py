"""LoRA (Hu et al. 2021) as peft applies it: low-rank adapters beside frozen linear weights.

Each targeted ``nn.Linear`` gets ``lora_A`` (r x in) and ``lora_B`` (out x r) in the adapter
dtype (peft autocasts adapters to fp32); its forward adds
``lora_B(lora_A(dropout(x))) * scaling`` to the base output. The base weights may be quantized
(``TrainingSetup.quant``): then the base layer is bitsandbytes' and peft's 4-bit forward runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Final

from memplan.dtypes import DType, dtype_bytes
from memplan.errors import MemplanError
from memplan.methods.base import AddedParam, TuningMethod

if TYPE_CHECKING:
    from memplan.analytic.blocks import LinearSpec
    from memplan.analytic.context import StepContext
    from memplan.analytic.graph import ParamGrad, Segment, Tensor
    from memplan.architecture import Architecture
    from memplan.specs.model import ModelSpec
    from memplan.specs.training import LinearRole, TrainingSetup


def lora_roles(spec: ModelSpec, setup: TrainingSetup) -> frozenset[LinearRole]:
    """Roles that carry adapters: the setup's targets, else peft's default for the family.

    A fused projection carries the adapter when any of its parts is targeted (q, v -> qkv).
    """
    from memplan.families import family

    roles = frozenset(
        setup.lora_targets if setup.lora_targets is not None else family(spec.family).lora_roles
    )
    if roles & {"q", "k", "v"}:
        roles |= {"qkv"}
    if roles & {"gate", "up"}:
        roles |= {"gate_up"}
    return roles


# Target groups people pass (peft's "all-linear", and attention or MLP only), as roles.
TARGET_GROUPS: Final[dict[str, tuple[LinearRole, ...]]] = {
    "all-linear": ("q", "k", "v", "o", "qkv", "gate", "up", "gate_up", "down"),
    "attn": ("q", "k", "v", "o", "qkv"),
    "mlp": ("gate", "up", "gate_up", "down"),
}


def parse_targets(text: str, spec: ModelSpec) -> tuple[LinearRole, ...]:
    """Roles named by ``text``: a group (all-linear, attn, mlp), or a comma list of roles
    (q, v, gate_up, ...) or of ``spec``'s module names as peft matches them (q_proj, c_attn,
    self_attn.o_proj: the full name or a dotted suffix)."""
    from memplan.architecture import ParamKind, architecture
    from memplan.errors import MemplanError
    from memplan.specs.training import ALL_LINEAR

    if text.strip() in TARGET_GROUPS:
        return TARGET_GROUPS[text.strip()]
    linears = [
        (t.name.removesuffix(".weight"), t.role)
        for _, t in architecture(spec).tensors()
        if t.kind is ParamKind.LINEAR and t.role is not None
    ]
    roles: list[LinearRole] = []
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise MemplanError("--lora-targets is empty: name roles, modules or all-linear")
    for part in parts:
        if part in ALL_LINEAR:
            roles.append(part)
            continue
        found = [r for m, r in linears if m == part or m.endswith(f".{part}")]
        if not found:
            names = sorted({m.rsplit(".", 1)[-1] for m, _ in linears})
            raise MemplanError(
                f"--lora-targets: {spec.name} has no linear layer {part!r} (its modules: "
                f"{', '.join(names)}; or all-linear, attn, mlp)"
            )
        roles += [r for r in found if r is not None]
    return tuple(dict.fromkeys(roles))


def targeted_linears(spec: ModelSpec, setup: TrainingSetup) -> list[str]:
    """Names of the linear weights (in the parameter layout) that get adapters."""
    from memplan.architecture import ParamKind, architecture

    roles = lora_roles(spec, setup)
    return [
        f"{block.name}.{t.name}"
        for block, t in architecture(spec).tensors()
        if t.kind is ParamKind.LINEAR and t.role in roles and t.copies == 1
    ]


class LoRA(TuningMethod):
    name = "lora"
    peft = True
    summary = "low-rank adapters on frozen 16/32-bit weights (peft LoraConfig)"
    rank = 10
    uses_lora = True
    adds_matmul_params = True
    setting_fields: ClassVar[tuple[str, ...]] = (
        "lora_r",
        "lora_alpha",
        "lora_dropout",
        "lora_targets",
        "adapter_dtype",
    )
    # peft LoRA on a bf16 model: LoraConfig defaults (r=8, alpha=8, the family's targets).
    defaults: ClassVar[dict[str, Any]] = {"precision": "bf16", "optimizer": "adamw"}

    def unsupported(self, spec: ModelSpec, setup: TrainingSetup) -> str | None:
        from memplan.families import family

        experts = sorted(lora_roles(spec, setup) & set(family(spec.family).lora_expert_roles))
        if experts and spec.is_moe:
            # peft convert_peft_config_for_transformers: the v4 expert names become
            # target_parameters of the fused 3-D experts, wrapped by lora.ParamWrapper.
            return (
                f"lora_targets {','.join(experts)} on {spec.name}: peft puts lora.ParamWrapper "
                "adapters on the MoE parameters of these roles (its transformers-v5 MoE "
                "conversion; they refuse lora_dropout != 0), which memplan does not model; "
                "target the attention projections (q,k,v,o)"
            )
        if targeted_linears(spec, setup):
            return None
        from memplan.architecture import ParamKind, architecture

        have = sorted(
            {
                str(t.role)
                for _, t in architecture(spec).tensors()
                if t.kind is ParamKind.LINEAR and t.role and t.copies == 1
            }
        )
        wanted = ",".join(sorted(lora_roles(spec, setup)))
        return (
            f"lora_targets {wanted} select no linear layer of {spec.name} "
            f"(its linear layers: {', '.join(have)})"
        )

    def added_params(
        self, arch: Architecture, setup: TrainingSetup, ctx: StepContext
    ) -> list[AddedParam]:
        """lora_A (r x in) and lora_B (out x r) per targeted linear.

        Under tensor parallelism a column-parallel linear splits lora_B's rows, a row-parallel
        one lora_A's columns; the other matrix is replicated (Megatron-style LoRA).
        """
        from memplan.architecture import ROW_PARALLEL_ROLES, ParamKind

        r, tp = ctx.lora_r, ctx.tensor_parallel_degree
        out: list[AddedParam] = []
        for block, t in arch.tensors():
            if t.kind is not ParamKind.LINEAR or t.copies != 1 or not ctx.has_lora(t.role):
                continue
            row_parallel = t.role in ROW_PARALLEL_ROLES
            in_share = -(-t.in_features // tp) if row_parallel else t.in_features
            out_share = t.out_features if row_parallel else -(-t.out_features // tp)
            for part, rows, cols, full in (
                ("lora_A", r, in_share, r * t.in_features),
                ("lora_B", out_share, r, r * t.out_features),
            ):
                label = f"{block.name}.{t.name}.{part}"
                out.append(
                    AddedParam(
                        label,
                        rows * cols,
                        block.repeat,
                        full,
                        ctx.adapter_dtype,
                        (rows, cols),
                        in_step=t.in_step,
                    )
                )
        return out

    def linear(
        self,
        seg: Segment,
        ctx: StepContext,
        x: Tensor,
        out: Tensor,
        spec: LinearSpec,
        *,
        quantized: bool,
    ) -> Tensor:
        """peft ``lora.Linear.forward``: result + lora_B(lora_A(dropout(x))) * scaling.

        On a bitsandbytes base layer (peft ``lora.bnb.Linear4bit``) the base output is cloned
        first and the adapter output is cast to its dtype before the addition. peft's
        target_modules match nn.Linear modules: fused expert tensors get no adapter.
        """
        from memplan.analytic.blocks import cast, dropout

        if not ctx.has_lora(spec.role) or spec.copies != 1:
            return out
        base = out
        rows = x.numel // spec.in_features
        r = ctx.lora_r
        a_dtype = ctx.adapter_dtype
        label = spec.label
        # peft casts x to the adapter weights' dtype (_cast_input_dtype) before lora_A; its
        # 4-bit layer (lora.bnb.Linear4bit) only when autocast is off (requires_conversion).
        convert = not (quantized and ctx.amp)
        xa_cast = cast(seg, x, a_dtype, f"{label}.lora_input_cast") if convert else x
        xa = dropout(seg, ctx, xa_cast, ctx.lora_dropout, f"{label}.lora_dropout")
        lin_dtype = ctx.compute_dtype if ctx.amp else a_dtype
        a_grad = _adapter_grad(ctx, f"{label}.lora_A", r * spec.in_features)
        b_grad = _adapter_grad(ctx, f"{label}.lora_B", r * spec.out_features)
        if ctx.amp:  # autocast: both operands cast to the compute dtype, adapter weights cached
            # F.linear's autocast wrapper casts the weight first (C++ evaluates the cast
            # arguments right to left), then the input.
            wa = seg.op(
                f"{label}.lora_A.weight_cast",
                [],
                r * spec.in_features,
                lin_dtype,
                param_grads=[a_grad],
            )
            dropped = xa
            xa = cast(seg, xa, ctx.compute_dtype, f"{label}.lora_A.input_cast")
            # mm keeps the weight only for the input's gradient (none in a first layer
            # whose input requires no grad).
            h = seg.op(
                f"{label}.lora_A",
                [xa, wa],
                rows * r,
                lin_dtype,
                saves=[xa, wa if xa.requires_grad else None],
            )
            # lora_A(dropout(x)): the dropout output is the call's argument until it returns.
            seg.hold(dropped, label=f"{label}.lora_A.input")
            wb = seg.op(
                f"{label}.lora_B.weight_cast",
                [],
                r * spec.out_features,
                lin_dtype,
                param_grads=[b_grad],
            )
            seg.autocast_cached.extend([wa, wb])
            h = seg.op(
                f"{label}.lora_B", [h, wb], rows * spec.out_features, lin_dtype, saves=[h, wb]
            )
        else:
            h = seg.op(f"{label}.lora_A", [xa], rows * r, a_dtype, saves=[xa], param_grads=[a_grad])
            h = seg.op(
                f"{label}.lora_B",
                [h],
                rows * spec.out_features,
                a_dtype,
                saves=[h],
                param_grads=[b_grad],
            )
        scaled = seg.op(f"{label}.lora_scale", [h], h.numel, h.dtype)
        if quantized:  # "defensively clone" the 4-bit output, add the adapter output in its dtype
            base = seg.op(f"{label}.clone", [base], base.numel, base.dtype, passthrough_grad=True)
            if convert:
                scaled = cast(seg, scaled, base.dtype, f"{label}.lora_output_cast")
            # Under autocast result + output promotes (add is no autocast op).
            result = seg.op(
                f"{label}.lora_add",
                [base, scaled],
                base.numel,
                _wider(base.dtype, scaled.dtype),
                passthrough_grad=True,
            )
        else:
            # result + scaled promotes to the wider dtype; peft then casts back to the base dtype.
            wide = _wider(base.dtype, scaled.dtype)
            result = seg.op(
                f"{label}.lora_add", [base, scaled], base.numel, wide, passthrough_grad=True
            )
            result = cast(seg, result, base.dtype, f"{label}.lora_output_cast")
        # The caller's variable holds the input, and peft's `x` (rebound to the cast input by
        # _cast_input_dtype) the cast, until the forward returns (peft lora.Linear.forward).
        seg.hold(x, xa_cast, label=f"{label}.input")
        return result

    def apply(self, built: Any, spec: ModelSpec, setup: TrainingSetup) -> Any:
        """peft ``get_peft_model`` with ``LoraConfig`` on the roles' modules."""
        from peft import LoraConfig, get_peft_model

        from memplan.architecture import lora_target_names
        from memplan.families import family
        from memplan.torchsim.models import peft_task_type

        built.model.requires_grad_(False)
        from memplan.specs.training import ALL_LINEAR

        # A traced-only model: every linear layer but the head, or peft's defaults for its type.
        targets: list[str] | str | None = None
        if family(spec.family).traced_only:
            if setup.lora_targets is not None and set(setup.lora_targets) >= set(ALL_LINEAR):
                targets = "all-linear"
        else:
            names = lora_target_names(spec)
            targets = sorted({n for r in lora_roles(spec, setup) for n in names.get(r, ())})
        config = LoraConfig(
            **self.peft_options(setup),
            r=setup.lora_r,
            lora_alpha=setup.lora_alpha,  # type: ignore[arg-type]  # peft annotates int
            lora_dropout=setup.lora_dropout,
            target_modules=targets,
            # GPT-2's Conv1D stores (in, out): peft needs fan_in_fan_out=True for it.
            fan_in_fan_out=any(type(m).__name__ == "Conv1D" for m in built.model.modules()),
            bias="none",
            task_type=peft_task_type(built),
        )
        from memplan.torchsim.quant import Linear4bit

        if any(isinstance(m, Linear4bit) for m in built.model.modules()):
            from memplan.torchsim.qlora import LoraLinear4bit

            config._register_custom_module({Linear4bit: LoraLinear4bit})
        try:
            return get_peft_model(built.model, config)
        except ValueError as exc:  # no default targets for the model type
            raise MemplanError(f"peft cannot apply LoRA to {spec.name}: {exc}") from exc

    def peft_options(self, setup: TrainingSetup) -> dict[str, Any]:
        """LoraConfig options beyond the shared LoRA settings (a LoRA variant's switch)."""
        return {}

    def assumptions(self, spec: ModelSpec, setup: TrainingSetup) -> list[str]:
        # The modules that really get adapters: nn.Linear layers of the targeted roles (fused
        # 3-D expert tensors are no nn.Linear, so peft's target_modules never select them).
        from memplan.architecture import ParamKind, architecture, lora_target_names

        roles = lora_roles(spec, setup)
        targeted = {
            t.role
            for _, t in architecture(spec).tensors()
            if t.kind is ParamKind.LINEAR and t.role in roles and t.copies == 1
        }
        names = lora_target_names(spec)
        modules = sorted(n for r in targeted if r is not None for n in names[r])
        dropout = (
            f"; dropout {setup.lora_dropout} saves a mask per targeted input"
            if setup.lora_dropout
            else ""
        )
        return [
            f"LoRA r={setup.lora_r} alpha={setup.lora_alpha:g} on {', '.join(modules)}; adapter "
            f"weights in {setup.adapter_dtype.value} (peft autocast_adapter_dtype){dropout}"
        ]


def _wider(a: DType, b: DType) -> DType:
    """The dtype an elementwise op of ``a`` and ``b`` promotes to (the wider one)."""
    return a if dtype_bytes(a) >= dtype_bytes(b) else b


def _adapter_grad(ctx: StepContext, label: str, numel: int) -> ParamGrad:
    return ctx.param_grad(label, numel, trainable=True, dtype=ctx.adapter_dtype)


METHOD = LoRA()
