"""memplan and other people's estimators on the published reference cases, side by side.

Run through ``scripts/compare_estimators.sh``, which installs the estimators into their own
virtual environment (they are not memplan dependencies). Each estimator is asked only what it
can express, the way its own documentation uses it:

- accelerate ``estimate-memory`` (accelerate/commands/estimate.py): it needs the Hub for a
  model name, so its own steps are called on a model built from the case's config.json:
  ``init_empty_weights()`` + ``AutoModel.from_config(config, dtype=float32)`` (as
  ``create_empty_model`` does), ``calculate_maximum_sizes(model)``, then for the row of the
  run's weight dtype ``estimate_training_usage`` ("Training using Adam", full fine-tuning) or
  the row's "Total Size" (the load size: all it offers for a frozen base model under LoRA).
- DeepSpeed ``estimate_zero2/3_model_states_mem_needs`` (the rows the ``*_all_cold`` functions
  print): model states only, every parameter trained with fp32 Adam. Used for the runs that
  shard (ZeRO-3 offload, FSDP FULL_SHARD as ZeRO-3) and for single-GPU full fine-tuning
  (ZeRO-2 on one GPU, no offload).
- llm-analysis ``LLMAnalysis.training``: full fine-tuning of one stack of layers with Adam-like
  optimizers in 16-bit weights (its dtype configs have no fp32 weights, no LoRA, no
  encoder-decoder).

Writes docs/accuracy.md (the README's "Accuracy" section) and
memplan/references/estimators.json.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

from memplan.accuracy import relative_error
from memplan.architecture import architecture, count_params
from memplan.catalog import catalog_record
from memplan.specs import ModelSpec, TrainingSetup
from memplan.specs.model import Family
from memplan.validate import (
    MISS_THRESHOLD,
    REFERENCES_DIR,
    CaseResult,
    ReferenceCase,
    ValidationReport,
    case_model,
    load_cases,
    validate,
)

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Estimate:
    """One estimator's number for one case, or why it has none."""

    bytes: int | None
    how: str

    def to_json(self, measured: int) -> dict[str, Any]:
        err = None if self.bytes is None else relative_error(self.bytes, measured)
        return {"bytes": self.bytes, "error_fraction": err, "how": self.how}


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# -- the case's model as a Hugging Face config ---------------------------------------------------


def hf_config(case: ReferenceCase) -> dict[str, Any]:
    """The published config.json of the run's model (not memplan's stand-in family)."""
    name = case.memplan.model
    if not name.endswith(".json"):
        return dict(catalog_record(name)["config"])
    path = REFERENCES_DIR / name
    stem, _, family = path.name.removesuffix(".json").rpartition(".")
    if family in get_args(Family):  # configs/phi-1_5.falcon.json stands in for phi-1_5.json
        path = path.with_name(stem + ".json")
    config: dict[str, Any] = json.loads(path.read_text())
    return {**config, **(case.memplan.model_overrides or {})}


def largest_module_params(spec: ModelSpec) -> int:
    """Parameters of the largest single module (DeepSpeed's largest_layer_params)."""
    modules: dict[str, int] = {}
    for block, tensor in architecture(spec).tensors():
        module = f"{block.name}:{tensor.name.rsplit('.', 1)[0]}"
        modules[module] = modules.get(module, 0) + tensor.numel
    return max(modules.values())


# -- accelerate ------------------------------------------------------------------------------------


def _accelerate_dtype(setup: TrainingSetup) -> str:
    if setup.quant.value in ("nf4", "fp4"):
        return "int4"
    if setup.quant.value == "int8":
        return "int8"
    if setup.precision.is_amp and setup.method == "full":
        return "float16"  # accelerate's float16 training estimate is mixed precision
    return "float16" if setup.precision.value in ("bf16", "fp16") else "float32"


def accelerate_estimate(case: ReferenceCase) -> Estimate:
    import torch
    from accelerate import init_empty_weights
    from accelerate.commands.estimate import estimate_training_usage
    from accelerate.utils import calculate_maximum_sizes
    from transformers import AutoConfig, AutoModel

    config_dict = hf_config(case)
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    with init_empty_weights():
        try:
            model = AutoModel.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
        except TypeError:  # transformers < 4.56 names it torch_dtype
            model = AutoModel.from_config(config, torch_dtype=torch.float32)  # type: ignore[no-untyped-call]
    total_size, _ = calculate_maximum_sizes(model)
    setup = TrainingSetup(**case.memplan.setup)
    dtype = _accelerate_dtype(setup)
    if setup.method == "full":
        usage = max(estimate_training_usage(total_size, dtype).values())
        if usage == -1:
            return Estimate(None, f"no training estimate for {dtype}")
        return Estimate(int(usage), f"'{dtype}' row, Training using Adam")
    divisor = {"float32": 1, "float16": 2, "int8": 4, "int4": 8}[dtype]
    return Estimate(
        int(total_size / divisor), f"'{dtype}' row, Total Size (load size; no adapter training)"
    )


# -- DeepSpeed -------------------------------------------------------------------------------------


def deepspeed_estimate(case: ReferenceCase) -> Estimate:
    from deepspeed.runtime.zero.stage3 import (  # type: ignore[import-not-found]
        estimate_zero3_model_states_mem_needs,
    )
    from deepspeed.runtime.zero.stage_1_and_2 import (  # type: ignore[import-not-found]
        estimate_zero2_model_states_mem_needs,
    )

    spec = case_model(case)
    total = count_params(spec)
    largest = largest_module_params(spec)
    parallel = case.memplan.parallel
    gpus = int(parallel.get("num_gpus", 1))
    if parallel.get("zero_stage") == 3:
        offload = parallel.get("offload") == "optimizer+params"
        _, gpu, _ = estimate_zero3_model_states_mem_needs(
            total,
            largest,
            num_gpus_per_node=gpus,
            num_nodes=1,
            cpu_offload=offload,
            cpu_offload_params=offload,
            zero_init=True,
        )
        how = "ZeRO-3, offload_param+optimizer=cpu" if offload else f"ZeRO-3 over {gpus} GPUs"
        return Estimate(gpu, how)
    if case.memplan.setup.get("method") == "full" and gpus == 1:
        _, gpu = estimate_zero2_model_states_mem_needs(
            total, num_gpus_per_node=1, num_nodes=1, cpu_offload=False
        )
        return Estimate(gpu, "ZeRO-2 on 1 GPU, no offload (model states)")
    return Estimate(None, "adapter training without DeepSpeed: not expressible")


# -- llm-analysis ----------------------------------------------------------------------------------

_LLM_ANALYSIS_GPUS = {
    "a10g": "a10g-pcie-24gb",
    "v100-16gb": "v100-sxm-16gb",
    "a100-40gb-sxm": "a100-sxm-40gb",
    "a100-80gb-sxm": "a100-sxm-80gb",
}


def llm_analysis_estimate(case: ReferenceCase) -> Estimate:
    from llm_analysis.analysis import (  # type: ignore[import-not-found]
        ActivationRecomputation,
        LLMAnalysis,
    )
    from llm_analysis.config import (  # type: ignore[import-not-found]
        ModelConfig,
        get_dtype_config_by_name,
        get_gpu_config_by_name,
    )

    setup = TrainingSetup(**case.memplan.setup)
    spec = case_model(case)
    if setup.method != "full":
        return Estimate(None, "no LoRA / adapter training")
    if spec.is_encoder_decoder:
        return Estimate(None, "no encoder-decoder models")
    if setup.precision.value == "fp32":
        return Estimate(None, "no fp32-weight dtype config")
    optimizer = setup.optimizer.value
    if optimizer not in ("adamw", "adamw-8bit"):
        return Estimate(None, f"no {optimizer} state model")
    amp = setup.precision.is_amp
    # AdamW keeps two states: fp32 under AMP (8 bytes), in the weight dtype for pure 16-bit
    # training (4 bytes, no master copy), 1 byte each for 8-bit Adam (2 bytes).
    other_op_bytes = 2 if optimizer == "adamw-8bit" else 8 if amp else 4
    model = ModelConfig(
        name=spec.name,
        num_layers=spec.num_layers,
        n_head=spec.num_attention_heads,
        hidden_dim=spec.hidden_size,
        vocab_size=spec.vocab_size,
        max_seq_len=max(spec.max_position_embeddings, setup.seq_len),
        num_key_value_heads=spec.num_key_value_heads,
        ffn_embed_dim=spec.intermediate_size,
        expansion_ratio=spec.intermediate_size / spec.hidden_size,
        model_type=spec.family,
    )
    analysis = LLMAnalysis(
        model,
        get_gpu_config_by_name(_LLM_ANALYSIS_GPUS[case.memplan.gpu or "a100-80gb-sxm"]),
        get_dtype_config_by_name("w16a16e16"),
    )
    summary = analysis.training(
        batch_size_per_gpu=setup.micro_batch_size,
        gradient_accumulation_steps=setup.grad_accum_steps,
        seq_len=setup.seq_len,
        activation_recomputation=ActivationRecomputation.FULL
        if setup.grad_ckpt
        else ActivationRecomputation.NONE,
        master_weights_dtype_bytes=4 if amp else 0,
        other_op_bytes=other_op_bytes,
        flash_attn=setup.attention.value != "eager",
        softmax_dropout=spec.attention_dropout > 0,
        mlp_gated_linear_units=spec.gated_mlp,
    )
    return Estimate(
        int(summary["(weight+op_state+grad+act)_memory_per_gpu"]),
        "training(): weights + optimizer state + gradients + activations",
    )


ESTIMATORS: dict[str, tuple[str, Callable[[ReferenceCase], Estimate]]] = {
    "accelerate": ("accelerate", accelerate_estimate),
    "deepspeed": ("deepspeed", deepspeed_estimate),
    "llm-analysis": ("llm-analysis", llm_analysis_estimate),
}


def run_estimator(name: str, case: ReferenceCase) -> Estimate:
    dist, func = ESTIMATORS[name]
    if _version(dist) is None:
        return Estimate(None, "not installed")
    try:
        return func(case)
    except Exception as exc:  # an estimator that cannot take this model says why, in the table
        return Estimate(None, f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}")


# -- output ----------------------------------------------------------------------------------------


def _gb(num_bytes: int | None) -> str:
    return "-" if num_bytes is None else f"{num_bytes / 1e9:.2f}"


def _cell(est: dict[str, Any]) -> str:
    if est["bytes"] is None:
        return "n/a"
    return f"{est['bytes'] / 1e9:.2f} ({est['error_fraction']:+.0%})"


def _stats(errors: list[float]) -> str:
    if not errors:
        return "no case"
    absolute = [abs(e) for e in errors]
    return (
        f"{len(errors)} cases: median {statistics.median(absolute):.1%}, worst {max(absolute):.1%}"
    )


def markdown(rows: list[dict[str, Any]], summary: dict[str, Any], versions: dict[str, Any]) -> str:
    lines = [
        "# Accuracy",
        "",
        "<!-- Generated by scripts/compare_estimators.sh from memplan/references/. -->",
        "",
        f"memplan predicts {len(rows)} published fine-tuning runs whose peak GPU memory was "
        "measured (litgpt's resource tables, config hub and LoRA tutorial, the peft README, "
        "the transformers single-GPU performance docs), from the configuration each source "
        "states; where a source is silent, the record under `memplan/references/cases/` says "
        "what was assumed and why. Each measurement is compared like with like: "
        "`max_memory_allocated` with memplan's allocated peak, an nvidia-smi reading with "
        "reserved memory plus the CUDA context. Errors are (predicted - measured) / measured; "
        "GB are 10^9 bytes. `memplan validate` prints the same table.",
        "",
        "## Summary",
        "",
        f"- memplan, all cases: median absolute error {summary['all']['median_abs_error']:.1%}, "
        f"worst {summary['all']['max_abs_error']:.1%} (`{summary['all']['worst_case']}`).",
        "- memplan without the two cases the source itself flags SUSPECT: median "
        f"{summary['without_suspect']['median_abs_error']:.1%}, worst "
        f"{summary['without_suspect']['max_abs_error']:.1%} "
        f"(`{summary['without_suspect']['worst_case']}`).",
    ]
    for name in ESTIMATORS:
        errs = [r[name]["error_fraction"] for r in rows if r[name]["bytes"] is not None]
        lines.append(f"- {name} (on the cases it can express): {_stats(errs)}.")
    memplan_same = {
        name: [r["memplan"]["error_fraction"] for r in rows if r[name]["bytes"] is not None]
        for name in ESTIMATORS
    }
    lines.append(
        "- memplan on those same cases: "
        + "; ".join(f"{name}'s {_stats(errs)}" for name, errs in memplan_same.items())
        + "."
    )
    lines += [
        "",
        "| source | cases | memplan median abs error | memplan worst |",
        "|---|---:|---:|---:|",
    ]
    for source, s in summary["per_source"].items():
        lines.append(
            f"| {source} | {s['cases']} | {s['median_abs_error']:.1%} | "
            f"{s['max_abs_error']:.1%} (`{s['worst_case']}`) |"
        )
    lines += [
        "",
        "## Every case",
        "",
        "| case | metric | measured GB | memplan GB | accelerate GB | DeepSpeed GB "
        "| llm-analysis GB |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        flag = " (SUSPECT)" if r["suspect"] else ""
        lines.append(
            f"| `{r['id']}`{flag} | {r['metric']} | {_gb(r['measured_bytes'])} | "
            f"{_cell(r['memplan'])} | {_cell(r['accelerate'])} | {_cell(r['deepspeed'])} | "
            f"{_cell(r['llm-analysis'])} |"
        )
    lines += [
        "",
        "How each estimator was asked (n/a: it cannot express the case):",
        "",
        "- accelerate: its `estimate-memory` steps on `AutoModel.from_config` of the run's "
        "config.json on the meta device: 'Training using Adam' of the weight dtype's row for "
        "full fine-tuning; the row's 'Total Size' (load size) for LoRA, QLoRA and adapters, "
        "which it cannot express otherwise. No sharding: the whole model per GPU.",
        "- DeepSpeed: `estimate_zero3_model_states_mem_needs` (ZeRO-3 offload runs; FSDP "
        "FULL_SHARD runs as ZeRO-3 without offload) and `estimate_zero2_model_states_mem_needs` "
        "(single-GPU full fine-tuning, no offload): model states only, every parameter trained.",
        "- llm-analysis: `LLMAnalysis.training` with the run's batch, sequence, recomputation and "
        "optimizer bytes, for full fine-tuning with 16-bit weights.",
        "",
        "Versions: " + ", ".join(f"{k} {v or 'not installed'}" for k, v in versions.items()) + ".",
        "",
        f"## Cases memplan misses by more than {MISS_THRESHOLD:.0%}",
        "",
        "Each with the mechanism found (what memplan assumes vs what the run did). These are "
        "findings for the model, not tolerances: no constant was fitted to the cases.",
        "",
    ]
    misses = sorted(
        (r for r in rows if abs(r["memplan"]["error_fraction"]) > MISS_THRESHOLD),
        key=lambda r: -abs(r["memplan"]["error_fraction"]),
    )
    for r in misses:
        text = r["explanation"] or "No mechanism found yet."
        lines.append(f"- `{r['id']}` ({r['memplan']['error_fraction']:+.1%}): {text}")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-md", type=Path, default=ROOT / "docs" / "accuracy.md")
    parser.add_argument("--out-json", type=Path, default=REFERENCES_DIR / "estimators.json")
    parser.add_argument(
        "--memplan-json",
        type=Path,
        help="reuse the output of `memplan validate --json` instead of predicting again",
    )
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)  # llm-analysis and DeepSpeed log at import and per call

    if args.memplan_json:
        data = json.loads(args.memplan_json.read_text())
        report = ValidationReport(
            rows=[CaseResult.model_validate(r) for r in data["rows"]], simulator=data["simulator"]
        )
    else:
        report = validate()
    memplan_rows: dict[str, CaseResult] = {r.id: r for r in report.rows}
    rows = []
    for case in load_cases():
        mp = memplan_rows[case.id]
        measured = mp.measured_bytes
        row: dict[str, Any] = {
            "id": case.id,
            "source": mp.source,
            "metric": mp.metric,
            "suspect": mp.suspect,
            "measured_bytes": measured,
            "memplan": {
                "bytes": mp.predicted_bytes,
                "error_fraction": mp.error_fraction,
                "how": f"analytical, {mp.compared}",
            },
            "explanation": mp.explanation,
        }
        for name in ESTIMATORS:
            row[name] = run_estimator(name, case).to_json(measured)
        rows.append(row)
        print(
            f"{case.id}: " + ", ".join(f"{k} {_cell(row[k])}" for k in ("memplan", *ESTIMATORS)),
            file=sys.stderr,
        )
    versions = {
        d: _version(d) for d in ("accelerate", "deepspeed", "llm-analysis", "transformers", "torch")
    }
    args.out_json.write_text(
        json.dumps({"versions": versions, "summary": report.summary, "rows": rows}, indent=2) + "\n"
    )
    args.out_md.parent.mkdir(parents=True, exist_ok=True)
    args.out_md.write_text(markdown(rows, report.summary, versions))
    print(f"wrote {args.out_md} and {args.out_json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
