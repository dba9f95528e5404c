"""Every shipped hardware profile loads, is consistent, and carries its sources."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from memplan.errors import MemplanError
from memplan.hardware import (
    SOFTWARE_FEATURES,
    CloudOffer,
    HardwareProfile,
    list_profiles,
    load_profile,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
PROFILE_DIR = REPO_ROOT / "hardware_profiles"
# Recursive on purpose: a profile dropped into a subfolder must fail here, not vanish silently.
PROFILE_FILES = sorted(PROFILE_DIR.rglob("*.json"))
MiB = 2**20

REQUIRED_NAMES = {
    "rtx-3060-12gb", "rtx-3090", "rtx-4090", "rtx-5090",
    "rtx-a4000", "rtx-a5000", "rtx-a6000", "rtx-6000-ada", "l40s",
    "t4", "v100-16gb", "v100-32gb", "a10g", "l4", "a100-40gb-pcie", "a100-40gb-sxm",
    "a100-80gb-pcie", "a100-80gb-sxm", "h100-pcie", "h100-sxm", "h100-nvl", "h200", "b200", "gh200",
    "mi210", "mi250x", "mi300x", "mi325x", "gaudi2", "gaudi3",
    "tpu-v4", "tpu-v5e", "tpu-v5p", "tpu-v6e",
    "m2-ultra-192gb", "m3-max-128gb", "m4-max-128gb",
}  # fmt: skip


def _raw(path: Path) -> dict[str, object]:
    data: dict[str, object] = json.loads(path.read_text(encoding="utf-8"))
    return data


@pytest.mark.parametrize("path", PROFILE_FILES, ids=lambda p: p.name)
def test_every_file_validates_and_is_named_by_its_profile(path: Path) -> None:
    profile = HardwareProfile.model_validate(_raw(path))
    assert path.name == f"{profile.name}.json"
    assert path.parent == PROFILE_DIR  # flat folder: the wheel ships hardware_profiles/*.json


@pytest.mark.parametrize("path", PROFILE_FILES, ids=lambda p: p.name)
def test_byte_counts_are_json_integers(path: Path) -> None:
    raw = _raw(path)
    for field in ("memory_bytes", "usable_memory_bytes", "memory_bandwidth_bytes_per_s"):
        assert type(raw[field]) is int, field


def test_loader_sees_exactly_the_files_on_disk() -> None:
    assert len(PROFILE_FILES) >= 40
    assert [p.name for p in list_profiles()] == [path.stem for path in PROFILE_FILES]
    assert list_profiles() is list_profiles()  # cached


def test_required_accelerators_are_present() -> None:
    assert {p.name for p in list_profiles()} >= REQUIRED_NAMES


def test_names_and_aliases_are_unique_and_never_shadow_a_name() -> None:
    names = [p.name for p in list_profiles()]
    aliases = [alias for p in list_profiles() for alias in p.aliases]
    assert len(set(names)) == len(names)
    assert len(set(aliases)) == len(aliases)
    assert not set(aliases) & set(names)


@pytest.mark.parametrize(
    ("typed", "name"),
    [
        ("rtx-4090", "rtx-4090"),
        ("rtx-a6000", "rtx-a6000"),
        ("a100-40gb", "a100-40gb-sxm"),
        ("a100-80gb", "a100-80gb-sxm"),
        ("h100-80gb", "h100-sxm"),
        ("h100", "h100-sxm"),
        ("a6000", "rtx-a6000"),
        ("4090", "rtx-4090"),
        ("  H100-80GB ", "h100-sxm"),
        ("RTX-4090", "rtx-4090"),
    ],
)
def test_common_names_resolve(typed: str, name: str) -> None:
    assert load_profile(typed).name == name


def test_unknown_name_is_a_one_line_error_with_suggestions() -> None:
    with pytest.raises(MemplanError) as excinfo:
        load_profile("h100-sxn")
    message = str(excinfo.value)
    assert message == "unknown hardware 'h100-sxn'; did you mean h100-sxm, h100-nvl?"
    assert "\n" not in message


def test_a_family_name_suggests_its_variants() -> None:
    with pytest.raises(MemplanError) as excinfo:
        load_profile("a100")
    message = str(excinfo.value)
    assert message.startswith("unknown hardware 'a100'; did you mean a100-40gb-pcie, ")
    assert "a100-80gb-sxm" in message
    assert "a10," not in message


def test_unknown_name_without_close_match_points_to_the_listing() -> None:
    with pytest.raises(MemplanError, match=r"^unknown hardware 'zzz'; see `memplan gpus`$"):
        load_profile("zzz")


# Exact totals the driver reports, each read from a public capture:
#   h100-sxm 81559 MiB = 85520809984 B: modal-labs/modal-client PR 2797 (quotes both numbers);
#   a100-80gb-sxm 81920 MiB, a100-40gb-sxm 40960 MiB, l40s 46068 MiB, t4 15360 MiB: same PR;
#   rtx-4090 24564 MiB: RLinf/RLinf issue 255; rtx-3090 24576 MiB: noonghunna/club-3090 issue 1128;
#   rtx-a6000 49140 MiB (ECC off): public nvidia-smi captures; h200 143771 MiB: sgl-project/sglang
#   issue 3196; b200 183359 MiB: NVIDIA/TensorRT-LLM issue 10278; mi300x: rocm-smi VRAM Total.
@pytest.mark.parametrize(
    ("name", "usable_bytes"),
    [
        ("h100-sxm", 85_520_809_984),
        ("a100-80gb-sxm", 81920 * MiB),
        ("a100-40gb-sxm", 40960 * MiB),
        ("l40s", 46068 * MiB),
        ("t4", 15360 * MiB),
        ("rtx-4090", 24564 * MiB),
        ("rtx-3090", 24576 * MiB),
        ("rtx-a6000", 49140 * MiB),
        ("h200", 143771 * MiB),
        ("b200", 183359 * MiB),
        ("mi300x", 206_141_652_992),
    ],
)
def test_pinned_usable_memory(name: str, usable_bytes: int) -> None:
    assert load_profile(name).usable_memory_bytes == usable_bytes


@pytest.mark.parametrize("profile", list_profiles(), ids=lambda p: p.name)
def test_usable_memory_is_a_plausible_share_of_the_headline(profile: HardwareProfile) -> None:
    share = profile.usable_memory_bytes / profile.memory_bytes
    if profile.kind == "unified-memory":
        # The OS GPU limit is the whole story on unified memory.
        assert profile.usable_memory_bytes == int(profile.memory_bytes * profile.gpu_share_fraction)
        assert 0.5 <= profile.gpu_share_fraction < 1.0
    else:
        # ECC on GDDR costs 1/16 (A6000: 46068 of 49152 MiB); nothing loses more than T4's 6.25%.
        assert 0.93 <= share <= 1.0
        assert profile.gpu_share_fraction == 1.0


@pytest.mark.parametrize("profile", list_profiles(), ids=lambda p: p.name)
def test_throughput_and_bandwidth_are_in_range(profile: HardwareProfile) -> None:
    assert 100 * 10**9 <= profile.memory_bandwidth_bytes_per_s <= 10 * 10**12
    for tflops in (profile.bf16_tflops, profile.fp16_tflops, profile.fp8_tflops):
        assert tflops is None or 10 <= tflops <= 5000
    if profile.bf16_tflops is None or profile.fp16_tflops is None or profile.fp8_tflops is None:
        assert profile.compute_note, "say why a throughput is missing"


@pytest.mark.parametrize("name", ["v100-16gb", "v100-32gb", "t4"])
def test_pre_ampere_parts_have_no_bf16(name: str) -> None:
    profile = load_profile(name)
    assert profile.supports_bf16 is False
    assert profile.bf16_tflops is None


@pytest.mark.parametrize("profile", list_profiles(), ids=lambda p: p.name)
def test_every_price_carries_source_and_date(profile: HardwareProfile) -> None:
    assert profile.sources
    if profile.purchase_price_usd is not None:
        assert profile.purchase_price_source
        assert profile.purchase_price_date is not None
    for offer in profile.cloud:
        assert offer.source.strip()
        assert offer.date.year >= 2024
        assert offer.usd_per_gpu_hour == pytest.approx(
            offer.usd_per_hour / offer.gpus_per_instance, abs=1e-3
        )


def test_cheapest_offer_is_the_minimum_per_gpu_hour() -> None:
    # Lambda 1x A100 40GB at $1.48/h beats AWS p4d.24xlarge at $32.77/8 = $4.096/GPU-h.
    assert load_profile("a100-40gb-sxm").cheapest_usd_per_gpu_hour == pytest.approx(1.48)
    assert load_profile("mi300x").cheapest_usd_per_gpu_hour is None


def test_profiles_are_frozen_and_reject_unknown_fields() -> None:
    raw = _raw(PROFILE_DIR / "h100-sxm.json")
    with pytest.raises(ValidationError, match="hbm_gb"):
        HardwareProfile.model_validate({**raw, "hbm_gb": 80})
    with pytest.raises(ValidationError):
        load_profile("h100-sxm").name = "other"  # type: ignore[misc]


def test_inconsistent_profiles_are_rejected() -> None:
    raw = _raw(PROFILE_DIR / "v100-16gb.json")
    with pytest.raises(ValidationError, match="supports_bf16=false"):
        HardwareProfile.model_validate({**raw, "bf16_tflops": 100.0})
    with pytest.raises(ValidationError, match="exceeds memory_bytes"):
        HardwareProfile.model_validate({**raw, "usable_memory_bytes": 17 * 2**30})
    with pytest.raises(ValidationError, match="must be given together"):
        HardwareProfile.model_validate({**raw, "purchase_price_usd": 9000.0})


def test_cloud_offer_per_gpu_price_must_match_the_instance_price() -> None:
    with pytest.raises(ValidationError, match="usd_per_gpu_hour"):
        CloudOffer(
            provider="AWS",
            instance="p4d.24xlarge",
            gpus_per_instance=8,
            usd_per_hour=32.77,
            usd_per_gpu_hour=32.77,
            source="test",
            date="2026-06-24",
        )


# ------------------------------------------------------------------ node and software


@pytest.mark.parametrize("profile", list_profiles(), ids=lambda p: p.name)
def test_every_node_value_and_software_feature_carries_a_source(profile: HardwareProfile) -> None:
    node = profile.node
    for field in (
        "gpus_per_node",
        "host_memory_bytes",
        "host_link_bytes_per_s",
        "intra_node_bytes_per_s",
        "inter_node_bytes_per_s",
    ):
        if getattr(node, field) is not None:
            assert node.sources[field].strip(), field
    assert set(profile.software) == set(SOFTWARE_FEATURES)
    assert all(support.source.strip() for support in profile.software.values())


@pytest.mark.parametrize("path", PROFILE_FILES, ids=lambda p: p.name)
def test_node_byte_counts_are_json_integers(path: Path) -> None:
    node = _raw(path)["node"]
    assert isinstance(node, dict)
    for field, value in node.items():
        if field.endswith(("_bytes", "_per_s", "_node")):
            assert type(value) is int, field


@pytest.mark.parametrize("profile", list_profiles(), ids=lambda p: p.name)
def test_node_links_are_in_range(profile: HardwareProfile) -> None:
    node = profile.node
    per_second = (node.host_link_bytes_per_s, node.intra_node_bytes_per_s)
    assert all(v is None or 10**10 <= v <= 10**12 for v in per_second)  # PCIe 3.0 .. NVLink 5
    assert node.inter_node_bytes_per_s is None or 10**9 <= node.inter_node_bytes_per_s <= 10**12
    assert node.host_memory_bytes is None or 2**36 <= node.host_memory_bytes <= 2**43


# Pinned from each source: one per kind of system.
@pytest.mark.parametrize(
    ("name", "gpus", "host_bytes", "inter_bytes_per_s"),
    [
        ("h100-sxm", 8, 2048 * 2**30, 3200 * 10**9 // 8),  # AWS p5.48xlarge
        ("a100-40gb-sxm", 8, 1152 * 2**30, 400 * 10**9 // 8),  # AWS p4d.24xlarge
        ("l4", 8, 768 * 2**30, 100 * 10**9 // 8),  # AWS g6.48xlarge
        ("b200", 8, 2 * 10**12, 3200 * 10**9 // 8),  # DGX B200 datasheet
        ("gh200", 1, 432 * 2**30, None),  # Lambda 1x GH200
        ("rtx-a6000", 4, 400 * 2**30, None),  # Lambda 4x A6000
        ("rtx-4090", 1, None, None),  # one card per RunPod worker
    ],
)
def test_pinned_nodes(
    name: str, gpus: int, host_bytes: int | None, inter_bytes_per_s: int | None
) -> None:
    node = load_profile(name).node
    assert (node.gpus_per_node, node.host_memory_bytes) == (gpus, host_bytes)
    assert node.inter_node_bytes_per_s == inter_bytes_per_s


def test_collectives_run_at_the_device_link_within_a_node_and_the_network_share_beyond() -> None:
    h100 = load_profile("h100-sxm").node
    assert h100.collective_bytes_per_s(8) == 450 * 10**9  # NVLink 4: 900 GB/s both directions
    assert h100.collective_bytes_per_s(16) == 3200 * 10**9 // 8 // 8  # 8x 400 Gb/s for 8 GPUs
    assert h100.spans(1024)
    l40s = load_profile("l40s").node  # no device link: PCIe 4.0 x16
    assert l40s.collective_bytes_per_s(4) == 31_507_692_307
    single = load_profile("rtx-4090").node
    assert single.spans(1)
    assert not single.spans(2)
    assert single.collective_bytes_per_s(2) is None
    assert load_profile("rtx-a6000").node.spans(4)
    assert not load_profile("rtx-a6000").node.spans(8)


# What the sources decide (bitsandbytes 0.50.0 README accelerator table; DeepSpeed accelerators;
# flash-attn README): bitsandbytes runs on ROCm CDNA in full, partly on Gaudi and Apple silicon,
# not at all on TPUs.
@pytest.mark.parametrize(
    ("name", "available"),
    [
        ("h100-sxm", set(SOFTWARE_FEATURES)),
        ("b200", set(SOFTWARE_FEATURES) - {"flash-attn"}),  # Ampere/Ada/Hopper only
        ("v100-32gb", set(SOFTWARE_FEATURES) - {"bitsandbytes-int8", "flash-attn"}),
        ("t4", set(SOFTWARE_FEATURES) - {"flash-attn"}),
        ("mi300x", set(SOFTWARE_FEATURES)),
        ("mi210", set(SOFTWARE_FEATURES)),
        ("gaudi2", {"bitsandbytes-int8", "deepspeed", "fsdp"}),
        ("tpu-v5p", {"fsdp"}),  # PyTorch/XLA FSDP; no DeepSpeed, no bitsandbytes
        ("m3-max-128gb", {"bitsandbytes-4bit", "bitsandbytes-int8"}),
    ],
)
def test_software_support(name: str, available: set[str]) -> None:
    profile = load_profile(name)
    assert {f for f in SOFTWARE_FEATURES if profile.supports(f)} == available


def test_nodes_without_sources_or_with_inconsistent_links_are_rejected() -> None:
    raw = _raw(PROFILE_DIR / "h100-sxm.json")
    node = raw["node"]
    assert isinstance(node, dict)
    sources = dict(node["sources"])
    del sources["host_memory_bytes"]
    with pytest.raises(ValidationError, match="without a source: host_memory_bytes"):
        HardwareProfile.model_validate({**raw, "node": {**node, "sources": sources}})
    bare = {k: v for k, v in node.items() if k != "host_memory_bytes"}
    with pytest.raises(ValidationError, match="does not give: host_memory_bytes"):
        HardwareProfile.model_validate({**raw, "node": bare})
    with pytest.raises(ValidationError, match="exactly when gpus_per_node is 1"):
        HardwareProfile.model_validate({**raw, "node": {**node, "gpus_per_node": 1}})
    software = dict(raw["software"])  # type: ignore[call-overload]
    del software["fsdp"]
    with pytest.raises(ValidationError, match="software lacks fsdp"):
        HardwareProfile.model_validate({**raw, "software": software})
