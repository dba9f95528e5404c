"""axolotl 0.18 (src/axolotl/loaders/model.py, utils/schemas/config.py, training.py).

bf16 "auto": the model loads in bf16 and trains under bf16 autocast (modelled as pure bf16:
autocast leaves 16-bit weights uncast). A 4-bit model is prepared with peft's
prepare_model_for_kbit_training, then its norms, embeddings and LM head are cast back to the
load dtype (_convert_embedding_modules_dtype), so nothing but the adapters ends in fp32: the
same memory as a bf16 QLoRA without the preparation. NF4 with double quantization and bf16
quant storage (_set_quantization_config).
"""

from __future__ import annotations

from collections.abc import Mapping

from memplan.stacks.base import Default, Request, TrainingStack

_BF16 = Default("bf16", "axolotl schemas/config.py bf16='auto' (bf16 load + autocast)")
_FUSED = Default("fused", "axolotl schemas/training.py optimizer default adamw_torch_fused")
_ADAMW = Default("adamw", "axolotl schemas/training.py optimizer default adamw_torch_fused")
_DQ = Default(True, "axolotl loaders/model.py bnb_4bit_use_double_quant=True")


class Axolotl(TrainingStack):
    name = "axolotl"
    summary = "axolotl YAML recipes (schema defaults; bf16 load under autocast)"
    rank = 30
    not_modelled = (
        "axolotl enables checkpointing as use_reentrant=True (modelled as non-reentrant)",
    )

    def defaults(self, request: Request) -> Mapping[str, Default]:
        out = {"precision": _BF16, "optimizer": _ADAMW, "optimizer_impl": _FUSED}
        if request.quantized:
            out["double_quant"] = _DQ
        return out


STACK = Axolotl()
