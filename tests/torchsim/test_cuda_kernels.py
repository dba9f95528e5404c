"""CUDA's kernels on fake tensors (memplan.torchsim.cuda_kernels).

``simulate --device cuda`` and ``--device cpu`` trace the same step; they differ exactly where
the kernels do: the dropout masks (bool on CUDA, noise in the input's dtype on the CPU), what
SDPA saves (flash attention's fp32 log-sum-exp and uint64 RNG state on CUDA, the CPU flash
kernel's log-sum-exp in the compute dtype), and nothing else allocates differently.
"""

from __future__ import annotations

from collections import Counter

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from memplan.catalog import load_model  # noqa: E402
from memplan.specs import TrainingSetup  # noqa: E402
from memplan.torchsim.cuda_kernels import (  # noqa: E402
    CUDA_KERNELS,
    EFFICIENT,
    FLASH,
    MATH,
    sdpa_backend,
)
from memplan.torchsim.records import StorageRecord  # noqa: E402
from memplan.torchsim.step import trace_step  # noqa: E402

pytestmark = pytest.mark.torch


def _records(kernels: str) -> list[StorageRecord]:
    setup = TrainingSetup(method="full", micro_batch_size=2, seq_len=64, device=kernels)
    return trace_step(load_model("tiny-gpt2"), setup, kernels=kernels, steps=1).records


def _by_dtype(records: list[StorageRecord]) -> Counter[tuple[str, tuple[int, ...]]]:
    return Counter((r.dtype, r.shape) for r in records)


def test_cuda_and_cpu_traces_differ_exactly_where_the_kernels_do() -> None:
    spec = load_model("tiny-gpt2")
    cuda, cpu = _records("cuda"), _records("cpu")
    b, s, h = 2, 64, spec.hidden_size
    heads = spec.num_attention_heads
    layers = spec.num_layers
    cuda_kinds, cpu_kinds = _by_dtype(cuda), _by_dtype(cpu)
    # Dropout: embeddings, attention output and MLP output per layer (resid/embd_pdrop) keep a
    # bool mask on CUDA (native_dropout) and a noise tensor of the input's dtype on the CPU.
    hidden_masks = 1 + 2 * layers
    assert cuda_kinds[("bool", (b, s, h))] == hidden_masks
    assert cpu_kinds[("bool", (b, s, h))] == 0
    assert any(r.op == "native_dropout" for r in cuda)
    assert not any(r.op == "native_dropout" for r in cpu)
    assert any(r.op == "bernoulli_" or r.op == "bernoulli" for r in cpu) or any(
        r.op == "empty_like" for r in cpu
    )
    # SDPA: flash attention on CUDA keeps its RNG state (uint64 [2]) and an unused uint64 []
    # per layer and an fp32 log-sum-exp [b, heads, s]; the CPU's kernels keep neither.
    assert cuda_kinds[("uint64", (2,))] == layers
    assert cuda_kinds[("uint64", ())] == layers
    assert cpu_kinds[("uint64", (2,))] == 0
    assert cuda_kinds[("float32", (b, heads, s))] >= layers
    # The weights, gradients and optimizer states are the same storages on both.
    weights_cuda = sorted(r.nbytes for r in cuda if r.weight_category is not None)
    weights_cpu = sorted(r.nbytes for r in cpu if r.weight_category is not None)
    assert weights_cuda == weights_cpu


@pytest.mark.parametrize(
    ("dtype", "kv_heads", "mask", "head_dim", "expected"),
    [
        (torch.bfloat16, 4, False, 64, FLASH),
        (torch.bfloat16, 2, False, 64, MATH),  # grouped heads without enable_gqa
        (torch.bfloat16, 4, True, 64, EFFICIENT),  # flash takes no mask
        (torch.float32, 4, False, 64, EFFICIENT),  # flash is 16-bit only
        (torch.float32, 4, False, 6, MATH),  # fp32 needs head sizes in whole 4 elements
        (torch.bfloat16, 4, True, 12, MATH),  # 16-bit in whole 8 elements
    ],
)
def test_sdpa_backend_follows_select_sdp_backend(
    dtype: torch.dtype, kv_heads: int, mask: bool, head_dim: int, expected: str
) -> None:
    q = torch.empty(1, 4, 16, head_dim, dtype=dtype, device="meta")
    k = torch.empty(1, kv_heads, 16, head_dim, dtype=dtype, device="meta")
    assert sdpa_backend(q, k, k, has_mask=mask, is_causal=True, enable_gqa=False) == expected


def test_every_table_entry_names_its_source() -> None:
    for entry in CUDA_KERNELS:
        assert entry.source, entry.op
        assert entry.cuda, entry.op
        assert entry.cpu, entry.op
        assert any(
            root in entry.source for root in ("aten/src/ATen", "torch/", "tools/autograd")
        ), entry.op


def test_autocast_lists_in_the_table_are_the_ones_torch_registers() -> None:
    """The ops the table moves between autocast lists have a CUDA autocast kernel and no CPU
    one (or, for cross_entropy_loss, the reverse) in the installed torch's dispatcher."""
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    fp32_list = ("layer_norm", "native_layer_norm", "pow.Tensor_Scalar", "exp", "rsqrt")
    set_opt_dtype = ("softmax.int", "log_softmax.int", "sum", "cumsum")
    for op in fp32_list + set_opt_dtype:
        assert has("aten::" + op, "AutocastCUDA"), op
        assert not has("aten::" + op, "AutocastCPU"), op
    assert has("aten::cross_entropy_loss", "AutocastCPU")
    assert not has("aten::cross_entropy_loss", "AutocastCUDA")
