"""What a measured run records: the configuration, the machine, and memory at every phase.

Torch-free (pydantic only), so ``memplan verify`` reads results files on any machine.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, NonNegativeInt


class Environment(BaseModel):
    """The machine and software a run measured on."""

    model_config = ConfigDict(frozen=True)

    device_name: str = Field(description="torch.cuda.get_device_name(), or 'cpu'.")
    total_memory_bytes: NonNegativeInt = Field(
        description="torch.cuda.get_device_properties().total_memory."
    )
    driver: str | None = Field(default=None, description="NVIDIA driver version (NVML).")
    cuda: str | None = Field(default=None, description="torch.version.cuda.")
    torch: str
    transformers: str | None = None
    peft: str | None = None
    bitsandbytes: str | None = None
    python: str
    memplan: str


class PhaseSample(BaseModel):
    """Allocator counters at the end of one phase (peaks reset at its start)."""

    model_config = ConfigDict(frozen=True)

    step: int = Field(description="Optimizer step (warm-up steps are negative).")
    micro_batch: int = Field(default=0, description="Micro-batch within the step.")
    phase: str = Field(description="load, forward (incl. loss), backward, optimizer, zero_grad.")
    allocated_bytes: NonNegativeInt = Field(
        description="torch.cuda.memory_allocated() at the phase end."
    )
    max_allocated_bytes: NonNegativeInt = Field(
        description="torch.cuda.max_memory_allocated() in the phase."
    )
    reserved_bytes: NonNegativeInt = Field(
        description="torch.cuda.memory_reserved() at the phase end."
    )
    max_reserved_bytes: NonNegativeInt = Field(
        description="torch.cuda.max_memory_reserved() in the phase."
    )
    nvml_used_bytes: NonNegativeInt | None = Field(
        default=None, description="NVML device memory used at the phase end (all processes)."
    )


class OutOfMemory(BaseModel):
    """An out-of-memory error, recorded instead of a crash."""

    model_config = ConfigDict(frozen=True)

    step: int
    phase: str
    requested_bytes: NonNegativeInt | None = Field(
        description="What the failing allocation asked for."
    )
    message: str


class MeasuredRun(BaseModel):
    """One configuration run on one device (one rank of a multi-GPU run)."""

    model_config = ConfigDict(frozen=True)

    model: str = Field(description="Catalog name (or config path) of the model.")
    setup: dict[str, Any] = Field(description="TrainingSetup.model_dump(mode='json').")
    parallel: dict[str, Any] = Field(description="ParallelSetup.model_dump(mode='json').")
    rank: NonNegativeInt = 0
    environment: Environment
    cuda_context_bytes: NonNegativeInt | None = Field(
        default=None, description="NVML used after CUDA init minus before, minus torch's reserve."
    )
    memory_fraction: float | None = Field(
        default=None,
        gt=0,
        le=1,
        allow_inf_nan=False,
        description="torch.cuda.set_per_process_memory_fraction cap, if any.",
    )
    allocated_at_start_bytes: NonNegativeInt = Field(
        default=0,
        description="memory_allocated() before the model was built (e.g. cuBLAS workspaces).",
    )
    samples: list[PhaseSample] = Field(default_factory=list)
    oom: OutOfMemory | None = None
    wall_time_s: NonNegativeFloat = 0.0
    notes: list[str] = Field(default_factory=list)
    label: str = Field(default="", description="Free-form name of the case in a matrix.")

    def steady_samples(self) -> list[PhaseSample]:
        """Samples of the measured steps (not the warm-up), or all when none are measured."""
        measured = [s for s in self.samples if s.step >= 0]
        return measured or list(self.samples)

    @property
    def peak_allocated_bytes(self) -> int:
        return max((s.max_allocated_bytes for s in self.samples), default=0)

    @property
    def peak_reserved_bytes(self) -> int:
        return max((s.max_reserved_bytes for s in self.samples), default=0)

    @property
    def peak_nvml_bytes(self) -> int | None:
        values = [s.nvml_used_bytes for s in self.samples if s.nvml_used_bytes is not None]
        return max(values) if values else None


class ResultsFile(BaseModel):
    """A file of measured runs from one machine (validation/results/<gpu>-<date>.json)."""

    model_config = ConfigDict(frozen=True)

    created: str = Field(description="ISO date and time the file was written.")
    environment: Environment
    nvml_baseline_bytes: NonNegativeInt | None = Field(
        default=None, description="NVML used before the process initialised CUDA."
    )
    runs: list[MeasuredRun]
    wall_time_s: NonNegativeFloat = 0.0
