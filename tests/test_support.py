"""Software a setup and a layout need, and the machines a layout needs."""

from __future__ import annotations

import pytest

from memplan.hardware import load_profile
from memplan.specs import ParallelSetup, TrainingSetup
from memplan.support import layout_needs, machine_fits, missing, setup_needs


@pytest.mark.parametrize(
    ("setup", "needs"),
    [
        (TrainingSetup(method="lora"), ()),
        (TrainingSetup(method="full"), ()),
        (
            TrainingSetup(method="qlora"),
            ("bitsandbytes-4bit", "bitsandbytes-optimizers", "bitsandbytes-paged"),
        ),
        (TrainingSetup(method="qlora", optimizer="adamw"), ("bitsandbytes-4bit",)),
        (TrainingSetup(method="lora", quant="int8"), ("bitsandbytes-int8",)),
        (TrainingSetup(method="full", optimizer="adamw-8bit"), ("bitsandbytes-optimizers",)),
        (TrainingSetup(method="full", optimizer="lion"), ("bitsandbytes-optimizers",)),
        (TrainingSetup(method="lora", attention="flash"), ("flash-attn",)),
    ],
)
def test_setup_needs(setup: TrainingSetup, needs: tuple[str, ...]) -> None:
    assert setup_needs(setup) == needs


@pytest.mark.parametrize(
    ("parallel", "needs"),
    [
        (ParallelSetup(), ()),
        (ParallelSetup(num_gpus=8), ()),  # plain data parallelism: any framework
        (ParallelSetup(num_gpus=8, zero_stage=1), ("deepspeed",)),
        (
            ParallelSetup(num_gpus=8, zero_stage=3, offload="optimizer"),
            ("deepspeed", "deepspeed-offload"),
        ),
        (ParallelSetup(num_gpus=8, zero_stage=2, sharding="fsdp"), ("fsdp",)),
        (ParallelSetup(num_gpus=8, zero_stage=3, sharding="fsdp"), ("fsdp",)),
    ],
)
def test_layout_needs(parallel: ParallelSetup, needs: tuple[str, ...]) -> None:
    assert layout_needs(parallel) == needs


def test_missing_names_each_feature_with_its_source() -> None:
    lacking = missing(load_profile("tpu-v6e"), setup_needs(TrainingSetup(method="qlora")))
    assert set(lacking) == {"bitsandbytes-4bit", "bitsandbytes-optimizers", "bitsandbytes-paged"}
    assert all("bitsandbytes" in source for source in lacking.values())
    assert missing(load_profile("mi300x"), setup_needs(TrainingSetup(method="qlora"))) == {}


def test_machines_bound_device_counts_and_offload() -> None:
    h100 = load_profile("h100-sxm")  # AWS p5.48xlarge: 8 per node, 2 TiB, 3200 Gbps
    assert machine_fits(h100, ParallelSetup(num_gpus=64, zero_stage=3), 0)
    offload = ParallelSetup(num_gpus=16, zero_stage=3, offload="optimizer")
    assert machine_fits(h100, offload, 256 * 2**30)  # 8 devices x 256 GiB = 2 TiB per node
    assert not machine_fits(h100, offload, 256 * 2**30 + 1)
    gh200 = load_profile("gh200")  # one superchip per node, no cluster network published
    assert machine_fits(gh200, ParallelSetup(zero_stage=2, offload="optimizer"), 400 * 2**30)
    assert not machine_fits(gh200, ParallelSetup(num_gpus=2), 0)
