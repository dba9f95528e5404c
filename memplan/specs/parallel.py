"""ParallelSetup: how one training step is spread over GPUs."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator

from memplan._compat import StrEnum


class Sharding(StrEnum):
    """Who shards model state across data-parallel ranks."""

    DEEPSPEED = "deepspeed"  # DeepSpeed ZeRO stages 1-3
    FSDP = "fsdp"  # PyTorch FSDP: NO_SHARD (~DDP), SHARD_GRAD_OP (~ZeRO-2), FULL_SHARD (~ZeRO-3)


class FSDPStrategy(StrEnum):
    """torch.distributed.fsdp.ShardingStrategy, as (ZeRO stage, sharded within a node)."""

    FULL_SHARD = "full-shard"  # parameters, gradients and optimizer state: ZeRO-3
    SHARD_GRAD_OP = "shard-grad-op"  # gradients and optimizer state: ZeRO-2
    HYBRID_SHARD = "hybrid-shard"  # FULL_SHARD within a node, replicated across nodes
    NO_SHARD = "no-shard"  # every rank holds everything (DistributedDataParallel's layout)

    @property
    def zero_stage(self) -> int:
        return {"full-shard": 3, "shard-grad-op": 2, "hybrid-shard": 3, "no-shard": 0}[self.value]


class Offload(StrEnum):
    NONE = "none"
    OPTIMIZER = "optimizer"  # ZeRO-Offload: optimizer state (and fp32 master) in CPU RAM
    OPTIMIZER_AND_PARAMS = "optimizer+params"  # ZeRO-Infinity style: parameters too (stage 3)


class ParallelSetup(BaseModel):
    """Data-parallel sharding, offload and tensor parallelism of one run."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    num_gpus: PositiveInt = Field(default=1, description="GPUs taking part in the run.")
    zero_stage: int = Field(
        default=0,
        ge=0,
        le=3,
        description="ZeRO stage: 1 shards optimizer state, 2 also gradients, 3 also parameters.",
    )
    sharding: Sharding = Field(
        default=Sharding.DEEPSPEED, description="DeepSpeed ZeRO or PyTorch FSDP does the sharding."
    )
    offload: Offload = Field(default=Offload.NONE, description="CPU offload of model state.")
    tensor_parallel_degree: PositiveInt = Field(
        default=1, description="GPUs each layer's matrices are split across (Megatron-style)."
    )
    reduce_bucket_elements: PositiveInt | None = Field(
        default=None,
        description="DeepSpeed reduce_bucket_size (gradient reduce buffer, elements); None: "
        "DeepSpeed's default 5e8 (Hugging Face's 'auto' config sets hidden_size**2).",
    )
    max_live_parameters: PositiveInt | None = Field(
        default=None,
        description="DeepSpeed stage3_max_live_parameters: gathered parameters kept on the GPU "
        "at once under ZeRO-3; None: DeepSpeed's default 1e9.",
    )
    fsdp_mixed_units: bool = Field(
        default=False,
        description="FSDP wraps whole transformer blocks, frozen and trainable parameters in one "
        "FlatParameter (use_orig_params=True: Lightning/litgpt, a transformer-layer auto-wrap "
        "policy), whose gradient covers the frozen ones too; False (the default: the Hugging "
        "Face Trainer replaces the wrap policy of a peft model by peft's fsdp_auto_wrap_policy, "
        "transformers distributed/fsdp.py update_fsdp_plugin_peft): the trainable modules are "
        "units of their own, frozen units get no gradient.",
    )
    fsdp_version: Literal[1, 2] = Field(
        default=1,
        description="FSDP1 (FullyShardedDataParallel: FlatParameters, no_sync accumulation) or "
        "FSDP2 (fully_shard: each parameter a DTensor sharded on dim 0, all-gathered and "
        "reduce-scattered per unit; gradient accumulation keeps sharded gradients). 1: "
        "accelerate's default (FullyShardedDataParallelPlugin.fsdp_version, FSDP_VERSION=1).",
    )
    shard_group_size: PositiveInt | None = Field(
        default=None,
        description="Data-parallel ranks that shard model state among themselves; None: all of "
        "them. FSDP's HYBRID_SHARD shards within a node (the GPUs of one node) and replicates "
        "across nodes.",
    )

    @model_validator(mode="before")
    @classmethod
    def _fsdp_default_strategy(cls, data: Any) -> Any:
        """FSDP without a stage means FSDP's default, FULL_SHARD (stage 3), not no sharding."""
        fsdp = isinstance(data, dict) and str(data.get("sharding")) in ("fsdp", "Sharding.FSDP")
        if fsdp and data.get("zero_stage") is None:
            return {**data, "zero_stage": 3}
        return data

    @model_validator(mode="after")
    def _check_layout(self) -> ParallelSetup:
        if self.num_gpus % self.tensor_parallel_degree:
            raise ValueError(
                f"tensor_parallel_degree={self.tensor_parallel_degree} does not divide "
                f"num_gpus={self.num_gpus}"
            )
        if self.sharding is Sharding.FSDP and self.zero_stage == 1:
            raise ValueError(
                "FSDP has no ZeRO-1 equivalent: use zero_stage=2 (SHARD_GRAD_OP), 3 "
                "(FULL_SHARD, FSDP's default) or 0 (NO_SHARD)"
            )
        if self.sharding is Sharding.FSDP and self.offload is Offload.OPTIMIZER:
            raise ValueError(
                "FSDP's CPUOffload moves parameters and gradients, and the optimizer steps on the "
                "host: use offload=optimizer+params (FSDP cannot offload the optimizer alone)"
            )
        if self.shard_group_size is not None:
            if self.data_parallel_degree % self.shard_group_size:
                raise ValueError(
                    f"shard_group_size={self.shard_group_size} does not divide the "
                    f"data-parallel degree {self.data_parallel_degree}"
                )
            if self.zero_stage == 0:
                raise ValueError("shard_group_size needs a ZeRO stage or FSDP strategy that shards")
            if self.sharding is not Sharding.FSDP:
                raise ValueError(
                    "shard_group_size is FSDP's HYBRID_SHARD: DeepSpeed ZeRO shards across every "
                    "data-parallel rank"
                )
        if self.offload is Offload.OPTIMIZER_AND_PARAMS and self.zero_stage != 3:
            raise ValueError(
                f"offload=optimizer+params needs zero_stage=3 (parameters are sharded only at "
                f"stage 3), got zero_stage={self.zero_stage}"
            )
        if self.offload is Offload.OPTIMIZER and self.zero_stage == 0:
            raise ValueError("offload=optimizer needs a ZeRO stage of 1 or more")
        return self

    @property
    def data_parallel_degree(self) -> int:
        """Replicas that shard model state among themselves."""
        return self.num_gpus // self.tensor_parallel_degree

    @property
    def shard_degree(self) -> int:
        """Ranks each sharded tensor is split across (the whole data-parallel group, or one
        node's GPUs under HYBRID_SHARD)."""
        return self.shard_group_size or self.data_parallel_degree

    @property
    def fsdp_strategy(self) -> FSDPStrategy | None:
        """FSDP's ShardingStrategy of this layout (None: not FSDP)."""
        if self.sharding is not Sharding.FSDP:
            return None
        if self.zero_stage == 0:
            return FSDPStrategy.NO_SHARD
        if self.zero_stage == 2:
            return FSDPStrategy.SHARD_GRAD_OP
        if self.shard_group_size not in (None, self.data_parallel_degree):
            return FSDPStrategy.HYBRID_SHARD
        return FSDPStrategy.FULL_SHARD

    @property
    def process_group_sizes(self) -> list[int]:
        """Ranks of each NCCL communicator one rank joins: the world group (DDP, ZeRO and FSDP
        run their collectives on it), a tensor-parallel and a data-parallel group when TP
        splits the world, and HYBRID_SHARD's shard and replica groups."""
        sizes = [self.num_gpus]
        if 1 < self.tensor_parallel_degree < self.num_gpus:
            sizes += [self.tensor_parallel_degree, self.data_parallel_degree]
        if self.shard_degree < self.data_parallel_degree and self.zero_stage:
            sizes += [self.shard_degree, self.data_parallel_degree // self.shard_degree]
        return sizes

    @property
    def uses_deepspeed(self) -> bool:
        return self.sharding is Sharding.DEEPSPEED and self.zero_stage > 0
