"""The plain-torch reference decoder is op for op transformers' Llama."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from memplan.catalog import load_model  # noqa: E402
from memplan.specs import TrainingSetup  # noqa: E402
from memplan.torchsim import trace_step  # noqa: E402
from memplan.torchsim.reference_decoder import ReferenceDecoder  # noqa: E402

pytestmark = pytest.mark.torch


def test_parameters_and_names_match_llama() -> None:
    spec = load_model("tiny-llama")
    model = ReferenceDecoder(spec)
    assert sum(p.numel() for p in model.parameters()) == spec.num_params == 631424
    names = {n for n, _ in model.named_parameters()}
    assert "model.layers.1.self_attn.q_proj.weight" in names
    assert "lm_head.weight" in names


def test_tied_head_shares_the_embedding() -> None:
    spec = load_model("tiny-llama").model_copy(update={"tie_word_embeddings": True})
    model = ReferenceDecoder(spec)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_loss_is_the_shifted_cross_entropy() -> None:
    torch.manual_seed(0)
    model = ReferenceDecoder(load_model("tiny-llama"))
    ids = torch.randint(0, 1024, (2, 16))
    out = model(ids, labels=ids)
    expected = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].reshape(-1, 1024), ids[:, 1:].reshape(-1)
    )
    assert out.loss is not None
    assert torch.allclose(out.loss, expected, atol=1e-5)


@pytest.mark.parametrize(
    "fields",
    [
        {"method": "full", "precision": "bf16"},
        {"method": "lora", "precision": "bf16"},
        {"method": "full", "grad_ckpt": True},
        {"method": "qlora"},
    ],
)
def test_traces_match_transformers_llama(fields: dict[str, object]) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    spec = load_model("tiny-llama")
    setup = TrainingSetup(micro_batch_size=2, seq_len=64, **fields)  # type: ignore[arg-type]
    hf = trace_step(spec, setup, mode="fake", backend="hf")
    reference = trace_step(spec, setup, mode="fake", backend="reference")
    hf_peak, reference_peak = hf.trace.peak(), reference.trace.peak()
    assert (hf_peak.peak_bytes, hf_peak.phase) == (reference_peak.peak_bytes, reference_peak.phase)
    assert hf_peak.breakdown_bytes == reference_peak.breakdown_bytes
    assert hf.trace.final_bytes() == reference.trace.final_bytes()
