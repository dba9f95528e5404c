"""``memplan`` command line: a thin layer over the Python API.

Bad input (unknown model, malformed config, impossible layout) prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from pydantic import ValidationError

from memplan.errors import MemplanError

EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        _fail(f"{self.prog}: {message}")


def _fail(message: str, status: int = EXIT_BAD_INPUT) -> NoReturn:
    from memplan.answers import one_line

    print(f"memplan: error: {one_line(message)}", file=sys.stderr)
    raise SystemExit(status)


_SAFETY_ARGS = ("--safety",)
_SAFETY_KWARGS: dict[str, Any] = {
    "type": lambda text: _fraction(text),
    "metavar": "FRACTION",
    "help": "a fit with less spare memory than this fraction of the device bytes is "
    "'borderline' (default: memplan's largest underestimate on published runs of the method)",
}


def _add_setup_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training setup (unset flags take the method's typical values)")
    from memplan.dtypes import Quantization
    from memplan.methods import method_names
    from memplan.specs import (
        Attention,
        FSDPStrategy,
        Objective,
        Offload,
        Optimizer,
        OptimizerImpl,
        Precision,
        RefModel,
    )
    from memplan.stacks import DEFAULT_STACK, stacks

    g.add_argument(
        "--stack",
        default=DEFAULT_STACK,
        choices=list(stacks()),
        help=f"the training stack whose defaults fill unset flags (default {DEFAULT_STACK}; "
        "`memplan stacks` lists each stack's defaults and their sources)",
    )
    g.add_argument(
        "--method",
        default="full",
        choices=method_names(),
        help="what trains (default full); qlora = LoRA on NF4 weights with the QLoRA recipe",
    )
    g.add_argument(
        "--precision",
        choices=[p.value for p in Precision],
        help="weights and compute: fp32, AMP over fp32 weights (bf16-amp, fp16-amp) or pure "
        "16-bit (bf16, fp16); default: the method's",
    )
    g.add_argument(
        "--quant",
        choices=[q.value for q in Quantization],
        help="bitsandbytes quantization of the frozen linear weights (default none)",
    )
    g.add_argument(
        "--double-quant",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="quantize the 4-bit scales too (QLoRA double quantization)",
    )
    g.add_argument(
        "--kbit-prep",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the Hugging Face QLoRA recipe: load quantized in bf16/fp16, "
        "peft.prepare_model_for_kbit_training (other parameters upcast to fp32), AMP autocast",
    )
    g.add_argument(
        "--optimizer",
        choices=[o.value for o in Optimizer],
        help="optimizer (default adamw; qlora: paged-adamw)",
    )
    g.add_argument(
        "--optimizer-impl",
        choices=[i.value for i in OptimizerImpl],
        help="torch optimizer loop: fused (default), foreach or for-loop (their temporaries)",
    )
    g.add_argument(
        "--master-weights",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="fp32 master copy of 16-bit weights "
        "(default: on under DeepSpeed ZeRO with 16-bit weights)",
    )
    g.add_argument(
        "--optimizer-in-backward",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="step each parameter's optimizer in its post-accumulate-grad hook and free its "
        "gradient (torchtune's optimizer_in_bwd; needs --grad-accum 1)",
    )
    g.add_argument(
        "--loss",
        type=_loss_flag,
        metavar="full|chunked[:N]|fused-linear|cut",
        help="loss implementation: full (transformers: whole logits, fp32 upcast; default), "
        "chunked[:N] (torchtune's LinearCrossEntropyLoss: N chunks of tokens, default 8), "
        "fused-linear (Liger) or cut (Apple's cut cross-entropy)",
    )
    g.add_argument(
        "--objective",
        choices=[o.value for o in Objective],
        help="training objective: sft (default) or dpo (trl DPOTrainer: --batch pairs, their "
        "chosen and rejected sequences in one forward, a reference model); orpo, kto and "
        "reward are refused (not modelled)",
    )
    g.add_argument(
        "--ref-model",
        choices=[r.value for r in RefModel],
        help="DPO's reference: copy (a second, frozen model; trl's default for full "
        "fine-tuning) or adapters-disabled (the policy without its adapters; trl's default "
        "for peft methods)",
    )
    g.add_argument(
        "--precomputed-ref",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="DPO with precompute_ref_log_probs: no reference model during training",
    )
    g.add_argument("--batch", type=int, help="micro-batch size (default 1; dpo: pairs)")
    g.add_argument("--seq", type=int, help="sequence length in tokens (default 512)")
    g.add_argument("--target-seq", type=int, help="decoder length of encoder-decoder models")
    g.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default 1)")
    g.add_argument(
        "--grad-ckpt",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="activation checkpointing",
    )
    g.add_argument("--grad-ckpt-every", type=int, help="checkpoint every k-th layer")
    g.add_argument(
        "--attn",
        choices=[a.value for a in Attention],
        help="attention implementation: sdpa (default), eager or flash",
    )
    g.add_argument("--lora-r", type=int, help="LoRA rank (default 8; qlora 64)")
    g.add_argument("--lora-alpha", type=float, help="LoRA alpha (default 8; qlora 16)")
    g.add_argument(
        "--lora-dropout", type=float, help="dropout on the LoRA input (default 0; qlora 0.05)"
    )
    g.add_argument(
        "--lora-targets",
        help="all-linear, attn, mlp, or a comma list of roles (q,v) or the model's module names "
        "(q_proj,v_proj)",
    )
    g.add_argument(
        "--adapter-dtype",
        choices=["fp32", "bf16", "fp16"],
        help="dtype of LoRA/adapter weights (default fp32, as peft autocasts them)",
    )
    g.add_argument("--adapter-size", type=int, help="bottleneck width of adapters (default 64)")
    g.add_argument("--prefix-len", type=int, help="virtual tokens of prefix tuning (default 30)")
    g.add_argument("--loha-r", type=int, help="LoHa rank (default 8, peft LoHaConfig)")
    g.add_argument("--loha-alpha", type=float, help="LoHa alpha (default 8)")
    g.add_argument("--lokr-r", type=int, help="LoKr rank (default 8, peft LoKrConfig)")
    g.add_argument("--lokr-alpha", type=float, help="LoKr alpha (default 8)")
    g.add_argument("--vera-r", type=int, help="VeRA rank of the shared projections (default 256)")
    g.add_argument(
        "--prompt-len",
        type=int,
        help="virtual tokens of prompt tuning and p-tuning (peft num_virtual_tokens; default 20)",
    )
    g.add_argument(
        "--device",
        choices=["cuda", "cpu"],
        help="kernels the step runs (default cuda; cpu: what a CPU step allocates)",
    )
    g.add_argument(
        "--assume",
        action="append",
        metavar="LIBRARY=VERSION",
        help="a library version the answer holds for where memory depends on it (repeatable; "
        "e.g. bitsandbytes=0.42.0; default: current releases)",
    )
    g.add_argument(
        "--model-set",
        action="append",
        metavar="FIELD=VALUE",
        help="change a field of the model (repeatable; e.g. tie_word_embeddings=false, "
        "num_decoder_layers=40); parameters are recounted",
    )
    q = p.add_argument_group("parallel layout")
    q.add_argument("--gpus", type=int, default=1, help="GPUs of the run (default 1)")
    q.add_argument(
        "--zero",
        type=int,
        default=None,
        help="ZeRO stage 0-3 (default 0; with --fsdp: 3, FSDP's FULL_SHARD; 2 is SHARD_GRAD_OP)",
    )
    q.add_argument(
        "--fsdp", action="store_true", help="shard with PyTorch FSDP instead of DeepSpeed"
    )
    q.add_argument(
        "--offload",
        default=None,
        choices=[o.value for o in Offload],
        help="ZeRO-Offload of optimizer state (and parameters) to host memory (default none; "
        "a stack that offloads when sharded, fsdp-qlora, sets it with --fsdp)",
    )
    q.add_argument("--tp", type=int, default=1, help="tensor-parallel degree")
    q.add_argument(
        "--fsdp-strategy",
        choices=[s.value for s in FSDPStrategy],
        help="FSDP's ShardingStrategy (implies --fsdp; default full-shard); hybrid-shard shards "
        "within a node of --gpus-per-node GPUs and replicates across nodes",
    )
    q.add_argument(
        "--gpus-per-node",
        type=int,
        default=None,
        help="GPUs of one node, the shard group of --fsdp-strategy hybrid-shard (default 8)",
    )
    q.add_argument(
        "--fsdp-wrap",
        choices=["blocks", "trainable"],
        help="FSDP units: the trainable modules alone (default: peft's wrap policy, which the "
        "Hugging Face Trainer uses for a peft model) or whole blocks mixing frozen and "
        "trainable parameters (litgpt/Lightning; their gradients cover the frozen part)",
    )
    q.add_argument(
        "--fsdp-version",
        type=int,
        choices=[1, 2],
        default=None,
        help="FSDP1 (FlatParameters; plan's default, as accelerate's) or FSDP2 (fully_shard: "
        "per-parameter shards; simulate's, which traces FSDP2)",
    )


def _loss_flag(text: str) -> tuple[str, int | None]:
    """``--loss full|chunked[:N]|fused-linear|cut``: the kind and chunked's number of chunks."""
    from memplan.specs import LossKind

    kind, colon, chunks = text.partition(":")
    kinds = [k.value for k in LossKind]
    if kind not in kinds:
        raise argparse.ArgumentTypeError(
            f"unknown loss {text!r} (full, chunked[:N], fused-linear or cut)"
        )
    if not colon:
        return kind, None
    if kind != "chunked":
        raise argparse.ArgumentTypeError(f"only chunked takes a number of chunks, not {kind}")
    if not chunks.isdigit() or int(chunks) < 1:
        raise argparse.ArgumentTypeError(
            f"chunked:N needs a positive number of chunks, got {chunks!r}"
        )
    return kind, int(chunks)


def setup_from_args(args: argparse.Namespace, spec: Any) -> Any:
    """The TrainingSetup the flags describe (``--lora-targets`` read against ``spec``)."""
    from memplan.methods.lora import parse_targets
    from memplan.specs import TrainingSetup

    fields: dict[str, Any] = {
        "stack": args.stack,
        "method": args.method,
        "precision": args.precision,
        "quant": args.quant,
        "double_quant": args.double_quant,
        "kbit_prep": args.kbit_prep,
        "optimizer": args.optimizer,
        "optimizer_impl": args.optimizer_impl,
        "optimizer_in_backward": args.optimizer_in_backward,
        "loss": args.loss[0] if args.loss else None,
        "loss_chunks": args.loss[1] if args.loss else None,
        "master_weights": args.master_weights,
        "objective": args.objective,
        "ref_model": args.ref_model,
        "precomputed_ref": args.precomputed_ref,
        "micro_batch_size": args.batch,
        "seq_len": args.seq,
        "target_seq_len": args.target_seq,
        "grad_accum_steps": args.grad_accum,
        "grad_ckpt": args.grad_ckpt,
        "grad_ckpt_every": args.grad_ckpt_every,
        "attention": args.attn,
        "lora_r": args.lora_r,
        "lora_alpha": args.lora_alpha,
        "lora_dropout": args.lora_dropout,
        "lora_targets": (
            parse_targets(args.lora_targets, spec) if args.lora_targets is not None else None
        ),
        "adapter_dtype": args.adapter_dtype,
        "adapter_size": args.adapter_size,
        "prefix_len": args.prefix_len,
        "prompt_len": args.prompt_len,
        "loha_r": args.loha_r,
        "loha_alpha": args.loha_alpha,
        "lokr_r": args.lokr_r,
        "lokr_alpha": args.lokr_alpha,
        "vera_r": args.vera_r,
        "device": args.device,
        "library_versions": _assumed_versions(args.assume) if args.assume else None,
    }
    return TrainingSetup(**{k: v for k, v in fields.items() if v is not None})


def model_from_args(args: argparse.Namespace, *, traced_only: bool = False) -> Any:
    """The model the command names, with its ``--model-set`` changes."""
    from memplan.catalog import load_model, with_overrides

    return with_overrides(load_model(args.model, traced_only=traced_only), model_changes(args))


def model_changes(args: argparse.Namespace) -> dict[str, object]:
    """``--model-set FIELD=VALUE`` as fields (values read as JSON, else as strings)."""
    overrides: dict[str, object] = {}
    for item in getattr(args, "model_set", None) or ():
        field, sep, text = item.partition("=")
        if not sep or not field.strip():
            raise MemplanError(f"--model-set {item!r}: expected FIELD=VALUE")
        try:
            value: object = json.loads(text)  # numbers, true/false, null
        except ValueError:
            value = text  # a bare word: a string field (hidden_act=gelu)
        overrides[field.strip()] = value
    return overrides


def _assumed_versions(items: list[str]) -> dict[str, str]:
    from memplan.versions import parse_assume

    try:
        return parse_assume(items)
    except ValueError as exc:
        raise MemplanError(f"--assume: {exc}") from None


def parallel_from_args(args: argparse.Namespace) -> Any:
    from memplan.specs import FSDPStrategy, ParallelSetup

    fsdp = args.fsdp or args.fsdp_strategy is not None
    if args.fsdp_wrap and not fsdp:
        raise MemplanError("--fsdp-wrap describes FSDP's units: it needs --fsdp")
    if args.fsdp_version is not None and not fsdp:
        raise MemplanError("--fsdp-version needs --fsdp")
    zero = args.zero if args.zero is not None else (None if fsdp else 0)
    group = None
    if args.fsdp_strategy is not None:
        strategy = FSDPStrategy(args.fsdp_strategy)
        if args.zero is not None and args.zero != strategy.zero_stage:
            raise MemplanError(
                f"--zero {args.zero} contradicts --fsdp-strategy {strategy.value} "
                f"(ZeRO-{strategy.zero_stage}): give one of them"
            )
        zero = strategy.zero_stage
        if strategy is FSDPStrategy.HYBRID_SHARD:
            group = min(args.gpus_per_node or 8, args.gpus // args.tp)
    if args.gpus_per_node is not None:
        if args.gpus_per_node < 1:
            raise MemplanError(
                f"--gpus-per-node must be a positive integer, got {args.gpus_per_node}"
            )
        if group is None:
            raise MemplanError(
                "--gpus-per-node sizes the shard group of --fsdp-strategy hybrid-shard"
            )
    return ParallelSetup(
        num_gpus=args.gpus,
        zero_stage=zero,
        sharding="fsdp" if fsdp else "deepspeed",
        offload=args.offload
        or (_stack_parallel_default(args, "offload", "none") if fsdp and zero != 0 else "none"),
        tensor_parallel_degree=args.tp,
        fsdp_mixed_units=(
            args.fsdp_wrap == "blocks"
            if args.fsdp_wrap
            else _stack_parallel_default(args, "fsdp_mixed_units", False)
        ),
        shard_group_size=group,
        fsdp_version=args.fsdp_version or 1,
    )


def _stack_parallel_default(args: argparse.Namespace, field: str, default: Any) -> Any:
    """The value the run's stack gives a ParallelSetup field the flags leave unset."""
    from memplan.stacks import stack

    given = stack(args.stack).parallel_defaults().get(field)
    return default if given is None else given.value


def _cmd_stacks(args: argparse.Namespace) -> int:
    from memplan.methods import method
    from memplan.stacks import Request, stacks

    requests = {
        "lora": Request(method("lora"), quantized=False),
        "qlora": Request(method("qlora"), quantized=True),
        "full": Request(method("full"), quantized=False),
    }
    rows: list[dict[str, Any]] = []
    for entry in stacks().values():
        by_run = {
            run: {f: {"value": d.value, "source": d.source} for f, d in entry.defaults(r).items()}
            for run, r in requests.items()
        }
        sharded = {
            f: {"value": d.value, "source": d.source} for f, d in entry.parallel_defaults().items()
        }
        rows.append(
            {"name": entry.name, "summary": entry.summary, "defaults": by_run, "sharded": sharded}
        )
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    from memplan.report import stdout_console

    console = stdout_console()
    for row in rows:
        console.print(f"[bold]{row['name']}[/bold]: {row['summary']}", soft_wrap=True)
        for run, fields in row["defaults"].items():
            for field, d in fields.items():
                console.print(
                    f"  {run}: {field}={_plain(d['value'])}  ({d['source']})",
                    soft_wrap=True,
                    markup=False,
                )
        for field, d in row["sharded"].items():
            console.print(
                f"  sharded: {field}={_plain(d['value'])}  ({d['source']})",
                soft_wrap=True,
                markup=False,
            )
    return 0


def _plain(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple | list):
        return ",".join(map(str, value))
    return str(getattr(value, "value", value))


def _cmd_plan(args: argparse.Namespace) -> int:
    from memplan.answers import dumps, plan_json, planned

    spec = model_from_args(args)
    setup, parallel = setup_from_args(args, spec), parallel_from_args(args)
    gpu: Any = args.gpu
    if args.cuda_context is not None:
        if not args.gpu:
            raise MemplanError("--cuda-context needs --gpu: it is part of the device's memory")
        from memplan.plan import resolve_gpu
        from memplan.units import parse_capacity

        context = parse_capacity(args.cuda_context)
        gpu = resolve_gpu(args.gpu).model_copy(update={"context_bytes": context})
    result, fixes = planned(spec, setup, parallel, gpu=gpu, safety=args.safety)
    if args.json:
        print(dumps(plan_json(result, fixes)))
    else:
        from memplan.report import print_plan

        print_plan(result, fixes=fixes)
    if args.plot:
        from memplan.analytic.predict import predict
        from memplan.plot import plan_figure

        _save_figure(plan_figure(result, predict(spec, setup, parallel).trace), args.plot)
    return 0


_PLOT_SUFFIXES = (".png", ".svg", ".pdf")


def _plot_path(text: str) -> str:
    """A picture file that can be written (checked before any work starts)."""
    from memplan.files import check_writable

    try:
        check_writable(text, what="picture", suffixes=_PLOT_SUFFIXES)
    except MemplanError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("picture: ")) from exc
    return text


def _fraction(text: str) -> float:
    """A finite number in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a fraction such as 0.05, got {text!r}"
        ) from None
    if not 0 <= value < 1:  # also refuses nan and inf
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {text!r}")
    return value


def _json_path(text: str) -> str:
    """A JSON output file that can be written (checked before any work starts)."""
    from memplan.files import check_writable

    try:
        check_writable(text, what="output", suffixes=(".json",))
    except MemplanError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("output: ")) from exc
    return text


def _save_figure(fig: Any, path: str) -> None:
    from memplan.plot import save

    try:
        written = save(fig, path)
    except OSError as exc:
        raise MemplanError(f"--plot: cannot write {path}: {exc.strerror or exc}") from exc
    print(f"wrote {written}", file=sys.stderr)


def _cmd_compare(args: argparse.Namespace) -> int:
    from memplan.catalog import load_model, with_overrides
    from memplan.compare import (
        DEFAULT_CAPACITY_GPUS,
        Case,
        capacities,
        compare_cases,
        comparison_table,
    )

    if args.method is not None:
        raise MemplanError("compare takes --methods (a comma list), not --method")
    models = [*([args.model] if args.model else []), *_comma_list(args.models)]
    methods = _comma_list(args.methods)
    if not models:
        raise MemplanError("compare: name a model (or --models a,b)")
    if not methods:
        raise MemplanError("compare: --methods is empty")
    specs = [with_overrides(load_model(m), model_changes(args)) for m in dict.fromkeys(models)]
    parallel = parallel_from_args(args)
    cases = [
        Case(
            label=method,
            model=spec,
            setup=setup_from_args(argparse.Namespace(**{**vars(args), "method": method}), spec),
            parallel=parallel,
            group=spec.name if len(specs) > 1 else "",
        )
        for spec in specs
        for method in dict.fromkeys(methods)
    ]
    result = compare_cases(cases, gpu=args.gpu, safety=args.safety)
    if args.json:
        print(json.dumps(result.model_dump(mode="json"), indent=2))
    else:
        from memplan.report import stdout_console

        stdout_console().print(comparison_table(result))
    if args.plot:
        from memplan.plot import breakdown_figure

        lines = capacities([*DEFAULT_CAPACITY_GPUS, *([args.gpu] if args.gpu else [])])
        names = ", ".join(s.name for s in specs)
        title = f"{names}: " + " vs ".join(dict.fromkeys(methods))
        _save_figure(breakdown_figure(result, capacities=lines, title=title), args.plot)
    return 0


def _comma_list(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def _cmd_models(args: argparse.Namespace) -> int:
    from memplan.catalog import catalog_names, load_model

    specs = [load_model(n) for n in catalog_names()]
    if args.json:
        rows = [
            {
                "name": s.name,
                "family": s.family,
                "params": s.num_params,
                "hf_id": s.hf_id,
                "layers": s.num_layers,
                "hidden_size": s.hidden_size,
                "vocab_size": s.vocab_size,
            }
            for s in specs
        ]
        print(json.dumps(rows, indent=2))
        return 0
    from rich.table import Table

    from memplan.report import stdout_console

    table = Table(title="memplan model catalog")
    for col in (
        "name",
        "family",
        "parameters",
        "layers",
        "hidden",
        "heads / kv",
        "vocab",
        "Hugging Face id",
    ):
        table.add_column(
            col, justify="right" if col in ("parameters", "layers", "hidden", "vocab") else "left"
        )
    for s in specs:
        table.add_row(
            s.name,
            s.family,
            f"{s.num_params or 0:,}",
            str(s.num_layers),
            str(s.hidden_size),
            f"{s.num_attention_heads} / {s.num_key_value_heads}",
            f"{s.vocab_size:,}",
            s.hf_id or "",
        )
    stdout_console().print(table)
    return 0


def _cmd_gpus(args: argparse.Namespace) -> int:
    from memplan.hardware import list_profiles

    profiles = list_profiles()
    if args.json:
        print(json.dumps([p.model_dump(mode="json") for p in profiles], indent=2))
        return 0
    from rich.table import Table

    from memplan.report import stdout_console
    from memplan.units import gib

    table = Table(title="memplan hardware profiles (usable memory as the device reports it)")
    for col in (
        "name",
        "device",
        "usable GiB",
        "bandwidth TB/s",
        "bf16 TFLOPS",
        "bf16",
        "$/GPU-hour",
        "price $",
        "per node",
        "host GiB",
    ):
        table.add_column(col, justify="left" if col in ("name", "device", "bf16") else "right")
    for p in profiles:
        cheapest = p.cheapest_usd_per_gpu_hour
        host = p.node.host_memory_bytes
        table.add_row(
            p.name,
            p.display_name,
            f"{gib(p.usable_memory_bytes):.2f}",
            f"{p.memory_bandwidth_bytes_per_s / 1e12:.2f}",
            f"{p.bf16_tflops:g}" if p.bf16_tflops else "-",
            "yes" if p.supports_bf16 else "no",
            f"{cheapest:.2f}" if cheapest else "-",
            f"{p.purchase_price_usd:,.0f}" if p.purchase_price_usd else "-",
            str(p.node.gpus_per_node),
            f"{gib(host):,.0f}" if host else "-",
        )
    stdout_console().print(table)
    return 0


def _cmd_fit(args: argparse.Namespace) -> int:
    from memplan.fit import fit

    spec = model_from_args(args)
    # The picture is the batch x sequence table: --plot computes it, --table prints it.
    table = args.table or args.plot is not None
    result = fit(
        spec,
        setup_from_args(args, spec),
        parallel_from_args(args),
        gpu=args.gpu,
        table=table,
        safety=args.safety,
    )
    shown = result if args.table else result.model_copy(update={"table": None})
    if args.json:
        from memplan.answers import dumps, fit_json

        print(dumps(fit_json(shown)))
    else:
        from memplan.report_fit import print_fit

        print_fit(shown)
    if args.plot:
        from memplan.compare import gpu_label, grid_from_fit
        from memplan.plot import heatmap_figure

        on = gpu_label(result.gpu.name)
        title = f"{result.model} {result.setup['method']} on {on}: micro-batch x sequence length"
        _save_figure(heatmap_figure(grid_from_fit(result), title=title), args.plot)
    return 0


def _cmd_recommend(args: argparse.Namespace) -> int:
    from memplan.recommend import recommend
    from memplan.throughput import parse_tokens

    spec = model_from_args(args)
    tokens = parse_tokens(args.tokens) if args.tokens else None
    result = recommend(
        spec,
        setup_from_args(args, spec),
        tokens=tokens,
        rank=args.rank,
        gpu=args.gpu,
        parallel=parallel_from_args(args),
    )
    if args.json:
        from memplan.answers import dumps, recommend_json

        print(dumps(recommend_json(result)))
    else:
        from memplan.report_fit import print_recommend

        print_recommend(result, show_all=args.all)
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from memplan.progress import note, status
    from memplan.validate import CaseResult, validate

    def streamed(index: int, count: int, row: CaseResult) -> None:
        """Simulating takes minutes: each case is reported as it finishes."""
        simulated = (
            f", simulated {row.simulated_error_fraction:+.1%}"
            if row.simulated_error_fraction is not None
            else f", {row.simulated_status}"
        )
        note(f"[{index}/{count}] {row.id}: predicted {row.error_fraction:+.1%}{simulated}")

    with status("predicting the reference cases"):
        report = validate(
            Path(args.references) if args.references else None,
            simulate=args.simulate,
            on_row=streamed if args.simulate else None,
        )
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
        return 0
    from memplan.validate import print_commands, print_report

    if args.commands:
        print_commands(report)
        return 0
    print_report(report, simulate=args.simulate)
    return 0


# Two examples per command, shown at the end of its --help.
EXAMPLES: dict[str, tuple[str, str]] = {
    "plan": (
        "memplan plan llama-65b --method qlora --gpu rtx-a6000",
        "memplan plan meta-llama/Llama-3.1-8B --method lora --batch 4 --seq 2048 --json",
    ),
    "compare": (
        "memplan compare llama-2-7b --gpu rtx-4090",
        "memplan compare llama-2-7b --models llama-65b --methods lora,qlora --plot cmp.png",
    ),
    "models": ("memplan models", "memplan models --json"),
    "stacks": ("memplan stacks", "memplan stacks --json"),
    "gpus": ("memplan gpus", "memplan gpus --json"),
    "fit": (
        "memplan fit llama-3.1-8b --method lora --gpu rtx-4090",
        "memplan fit llama-65b --method qlora --gpu rtx-a6000 --table --plot fit.png",
    ),
    "recommend": (
        "memplan recommend llama-3.1-70b --method full --tokens 50M",
        "memplan recommend llama-3.1-8b --method qlora --gpu rtx-4090",
    ),
    "simulate": (
        "memplan simulate llama-2-7b --method lora",
        "memplan simulate path/to/config.json --method qlora --batch 2 --seq 1024 --json",
    ),
    "measure": (
        "memplan measure --model tiny-llama --method lora --out run.json",
        "memplan measure --model llama-3.2-1b --method qlora --device cuda --out run.json",
    ),
    "verify": (
        "memplan verify run.json",
        "memplan verify validation/results/h100.json --plot v.png",
    ),
    "validate": ("memplan validate", "memplan validate --json"),
    "serve": ("memplan serve", "memplan serve --port 8080 --time-limit 60"),
}


def _with_examples(parser: argparse.ArgumentParser) -> None:
    """End every command's --help with its two examples."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                sub.formatter_class = argparse.RawDescriptionHelpFormatter
                sub.epilog = "examples:\n" + "\n".join(f"  {e}" for e in EXAMPLES[name])


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="memplan", description="GPU memory planner for training and fine-tuning LLMs."
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("plan", help="does a training run fit, and where does its memory go")
    p.add_argument("model", help="catalog name (memplan models) or a path to a config.json")
    _add_setup_flags(p)
    p.add_argument(
        "--gpu", help="hardware profile (memplan gpus) or a capacity such as 48GB / 24GiB"
    )
    p.add_argument(
        "--cuda-context",
        metavar="SIZE",
        help="the device's CUDA context as measured there (e.g. 1.3GiB; default "
        "512 MiB), outside the allocator",
    )
    p.add_argument(*_SAFETY_ARGS, **_SAFETY_KWARGS)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--plot", type=_plot_path, metavar="PATH", help="also draw the breakdown and timeline"
    )
    p.set_defaults(func=_cmd_plan)

    c = sub.add_parser("compare", help="several methods or models side by side (table + plot)")
    c.add_argument("model", nargs="?", help="catalog name or a path to a config.json")
    c.add_argument("--models", help="more models, a comma list (llama-2-7b,llama-65b)")
    c.add_argument(
        "--methods", default="full,lora,qlora", help="comma list (default full,lora,qlora)"
    )
    _add_setup_flags(c)
    c.set_defaults(method=None)  # one setup per --methods entry
    c.add_argument(
        "--gpu", help="hardware profile or capacity to judge against (also drawn as a line)"
    )
    c.add_argument(*_SAFETY_ARGS, **_SAFETY_KWARGS)
    c.add_argument(
        "--plot", type=_plot_path, metavar="PATH", help="stacked bars with 24/48/80 GB lines"
    )
    c.add_argument("--json", action="store_true", help="print one JSON object")
    c.set_defaults(func=_cmd_compare)

    m = sub.add_parser("models", help="list the built-in model catalog")
    m.add_argument("--json", action="store_true", help="print one JSON object")
    m.set_defaults(func=_cmd_models)

    st = sub.add_parser("stacks", help="list training stacks and the defaults each gives a run")
    st.add_argument("--json", action="store_true", help="print one JSON object")
    st.set_defaults(func=_cmd_stacks)

    g = sub.add_parser("gpus", help="list hardware profiles")
    g.add_argument("--json", action="store_true", help="print one JSON object")
    g.set_defaults(func=_cmd_gpus)

    f = sub.add_parser("fit", help="largest micro-batch and sequence length that fit a device")
    f.add_argument("model", help="catalog name (memplan models) or a path to a config.json")
    _add_setup_flags(f)
    f.add_argument(
        "--gpu",
        required=True,
        help="hardware profile (memplan gpus) or a capacity such as 48GB / 24GiB",
    )
    f.add_argument(*_SAFETY_ARGS, **_SAFETY_KWARGS)
    f.add_argument("--table", action="store_true", help="also a micro-batch x sequence table")
    f.add_argument(
        "--plot", type=_plot_path, metavar="PATH", help="draw the batch x sequence table"
    )
    f.add_argument("--json", action="store_true", help="print one JSON object")
    f.set_defaults(func=_cmd_fit)

    r = sub.add_parser(
        "recommend",
        help="accelerators and layouts that run the job cheapest (or fastest), and changes",
    )
    r.add_argument("model", help="catalog name (memplan models) or a path to a config.json")
    _add_setup_flags(r)
    r.add_argument("--tokens", help="training tokens for a time and cost estimate, e.g. 50M")
    r.add_argument(
        "--rank",
        choices=("cost", "time"),
        default="cost",
        help="order by the job's estimated cost (default) or time",
    )
    r.add_argument(
        "--all", action="store_true", help="print every fitting accelerator, not the top 10"
    )
    r.add_argument(
        "--gpu",
        help="a device to judge the given layout on; if it does not fit, list changes that would",
    )
    r.add_argument("--json", action="store_true", help="print one JSON object")
    r.set_defaults(func=_cmd_recommend)

    sim = sub.add_parser(
        "simulate", help="trace a real PyTorch step on fake tensors (extras torch, hf)"
    )
    sim.add_argument("model", help="catalog name (memplan models) or a path to a config.json")
    _add_setup_flags(sim)
    sim.add_argument("--gpu", help="hardware profile or capacity to judge the traced step on")
    sim.add_argument("--json", action="store_true", help="print one JSON object")
    sim.set_defaults(func=_cmd_simulate)

    meas = sub.add_parser(
        "measure", help="run and measure a real training step on this machine (cpu or cuda)"
    )
    meas.add_argument("--model", required=True, help="catalog name or a path to a config.json")
    _add_setup_flags(meas)
    meas.add_argument("--steps", type=int, default=2, help="optimizer steps to run (default 2)")
    meas.add_argument(
        "--out", type=_json_path, metavar="PATH", help="write the measured run to this .json file"
    )
    meas.add_argument("--gpu", help="hardware profile or capacity to judge the measured step on")
    meas.add_argument("--json", action="store_true", help="print one JSON object")
    meas.set_defaults(func=_cmd_measure)

    ver = sub.add_parser("verify", help="a measured run (or results file) against the prediction")
    ver.add_argument("results", help="JSON from `memplan measure --out` or validation/results/")
    ver.add_argument(
        "--tolerance",
        type=_fraction,
        default=0.05,
        help="allowed |error| of the allocated peak (fraction, default 0.05)",
    )
    ver.add_argument("--json", action="store_true", help="print one JSON object")
    ver.add_argument(
        "--plot", type=_plot_path, metavar="PATH", help="predicted vs measured scatter (PNG)"
    )
    ver.set_defaults(func=_cmd_verify)

    v = sub.add_parser(
        "validate", help="predict the published reference measurements and report the error"
    )
    v.add_argument("--json", action="store_true", help="rows and summary as one JSON object")
    v.add_argument(
        "--simulate",
        action="store_true",
        help="also trace each single-GPU case on fake tensors (needs the torch and hf extras)",
    )
    v.add_argument(
        "--commands",
        action="store_true",
        help="print each case as the memplan plan command that predicts it",
    )
    v.add_argument(
        "--references",
        help="folder holding cases/ and configs/ (default: memplan/references of this checkout)",
    )
    v.set_defaults(func=_cmd_validate)

    w = sub.add_parser(
        "serve", help="the planner as a local web page (plan, fit, recommend; extra web)"
    )
    w.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    w.add_argument("--port", type=_port, default=8000, help="port to listen on (default 8000)")
    w.add_argument(
        "--time-limit",
        type=_seconds,
        default=30.0,
        metavar="SECONDS",
        help="longest a request may compute before it is refused (default 30)",
    )
    w.set_defaults(func=_cmd_serve)
    _with_examples(parser)
    return parser


def _port(text: str) -> int:
    """A TCP port, 0 (any free one) to 65535."""
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"expected a port 0-65535, got {text!r}")
    return int(text)


def _seconds(text: str) -> float:
    """A positive, finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds such as 30, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        from memplan.web.app import serve
    except ImportError as exc:
        if exc.name not in ("starlette", "uvicorn", "anyio") and not str(exc.name).startswith(
            ("starlette.", "uvicorn.")
        ):
            raise
        raise MemplanError(
            f"memplan serve needs the web extra ({exc.name} is missing): pip install 'memplan[web]'"
        ) from None
    return serve(host=args.host, port=args.port, time_limit_s=args.time_limit)


def _cmd_simulate(args: argparse.Namespace) -> int:
    from memplan.simulate import check_simulated_layout, trace_and_compare

    parallel = parallel_from_args(args)
    if parallel.fsdp_strategy is not None and args.fsdp_version is None:
        parallel = parallel.model_copy(update={"fsdp_version": 2})  # the tracer runs FSDP2
    check_simulated_layout(parallel)
    from memplan.progress import status

    spec = model_from_args(args, traced_only=True)
    setup = setup_from_args(args, spec)
    with status(f"tracing {spec.name} ({setup.method}) on fake tensors"):
        comparison = trace_and_compare(spec, setup, mode="fake", gpu=args.gpu, parallel=parallel)
    return _print_traced(comparison, args)


def _cmd_measure(args: argparse.Namespace) -> int:
    device = args.device or "cpu"
    if device == "cuda":
        from memplan.measure.cuda import measure_cli

        return measure_cli(args)
    from memplan.simulate import trace_and_compare

    if args.steps != 2:
        raise MemplanError("a CPU measurement traces two steps (creation and steady state)")
    from memplan.progress import status

    spec = model_from_args(args)
    setup = setup_from_args(args, spec)
    with status(f"running {spec.name} ({setup.method}) on CPU tensors"):
        comparison = trace_and_compare(spec, setup, mode="cpu", gpu=args.gpu)
    assert comparison.analytical is not None  # measure loads modeled families only
    if args.out:
        record = {
            "model_reference": args.model,  # what `memplan verify` loads the model from
            "traced": comparison.traced.model_dump(mode="json"),
            "analytical": comparison.analytical.model_dump(mode="json"),
            "trace": comparison.trace.to_json(),
            "wall_time_s": comparison.wall_time_s,
        }
        from memplan.files import write_atomic

        write_atomic(args.out, json.dumps(record, indent=2), what="--out")
    return _print_traced(comparison, args)


def _cmd_verify(args: argparse.Namespace) -> int:
    from pathlib import Path

    from memplan.verify import verify_file

    verifications, summary = verify_file(Path(args.results))
    worst = summary.max_abs_error.get("allocated", 0.0)
    passed = worst <= args.tolerance
    if args.json:
        payload = {
            "passed": passed,
            "tolerance": args.tolerance,
            "runs": [
                {
                    **v.model_dump(mode="json", exclude={"prediction"}),
                    "errors": {c.name: c.error for c in v.checks},
                }
                for v in verifications
            ],
            **summary.model_dump(mode="json"),
        }
        print(json.dumps(payload, indent=2))
    else:
        from memplan.report import print_verification

        print_verification(verifications, summary)
        verdict = "PASS" if passed else "FAIL"
        relation = "within" if passed else "beyond"
        print(
            f"{verdict}: the worst allocated-peak error, {worst:.1%}, is {relation} the "
            f"tolerance of {args.tolerance:.1%}"
        )
    if args.plot:
        from memplan.plot import scatter_figure
        from memplan.verify import verification_points

        points = verification_points(verifications, Path(args.results).name)
        if not points:
            raise MemplanError(f"{args.results}: no completed run to plot")
        title = f"{summary.device}: memplan against {summary.n_runs} measured runs"
        _save_figure(scatter_figure(points, title=title), args.plot)
    return 0 if passed else 1


def _print_traced(comparison: Any, args: argparse.Namespace) -> int:
    if args.json:
        payload = comparison.traced.model_dump(mode="json")
        analytical = comparison.analytical
        payload["analytical"] = None if analytical is None else analytical.model_dump(mode="json")
        payload["difference_bytes"] = comparison.differences_bytes()
        payload["wall_time_s"] = comparison.wall_time_s
        print(json.dumps(payload, indent=2))
        return 0
    from memplan.report import print_comparison

    print_comparison(comparison)
    return 0


def _version() -> str:
    from memplan import __version__

    return f"memplan {__version__}"


EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C
EXIT_INTERNAL = 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; every failure ends in one line on stderr, never a traceback."""
    _tolerant_streams()
    # bitsandbytes logs, on import, a CPU kernel package it would like: advice to its users,
    # not ours to show (memplan runs its own NF4 layers on the CPU).
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        func: Callable[[argparse.Namespace], int] = args.func
        return func(args)
    except (MemplanError, ValidationError) as exc:
        from memplan.answers import error_message

        _fail(error_message(exc))
    except KeyboardInterrupt:
        _fail("interrupted", EXIT_INTERRUPTED)
    except BrokenPipeError:  # e.g. `memplan models | head`: the reader left
        _silence_stdout()
        return 0
    except (RecursionError, MemoryError, OverflowError) as exc:
        _fail(f"input too large to handle ({type(exc).__name__})")
    except OSError as exc:  # a full disk or a closed terminal while writing the output
        _fail(f"cannot write the output: {exc.strerror or exc}", EXIT_INTERNAL)
    except Exception as exc:
        if os.environ.get("MEMPLAN_DEBUG"):
            raise
        text = str(exc).splitlines()[0] if str(exc) else ""
        _fail(
            f"internal error ({type(exc).__name__}: {text[:200]}); set MEMPLAN_DEBUG=1 for "
            "the traceback",
            EXIT_INTERNAL,
        )


def _tolerant_streams() -> None:
    """Characters the terminal's encoding lacks (PYTHONIOENCODING=ascii) are escaped, not an
    error."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if callable(reconfigure):
            reconfigure(errors="backslashreplace")


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
