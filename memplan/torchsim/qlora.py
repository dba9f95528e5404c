"""peft's LoRA layer over :class:`memplan.torchsim.quant.Linear4bit`.

peft dispatches LoRA on bitsandbytes ``Linear4bit`` to ``peft.tuners.lora.bnb.Linear4bit``,
whose forward differs from the plain ``lora.Linear``: it clones the 4-bit layer's output
("defensively clone", a full output-sized temporary), and casts the input to the adapter dtype
only when autocast is off; a LoRA variant (DoRA) adds its own output to the clone and the sum
is cast back. This class registers through ``LoraConfig._register_custom_module``
and keeps that forward.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora.layer import Linear as LoraLinear


class LoraLinear4bit(LoraLinear):
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)  # type: ignore[no-untyped-call]
        result: torch.Tensor = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters or self.merged:
            return result
        result = result.clone()  # peft.tuners.lora.bnb.Linear4bit.forward
        for active_adapter in self.active_adapters:
            if active_adapter not in self.lora_A:
                continue
            lora_a = self.lora_A[active_adapter]
            lora_b = self.lora_B[active_adapter]
            dropout = self.lora_dropout[active_adapter]
            scaling = self.scaling[active_adapter]
            requires_conversion = not torch.is_autocast_enabled(x.device.type)
            expected_dtype = result.dtype
            adapter_dtype = lora_a.weight.dtype
            assert isinstance(adapter_dtype, torch.dtype)
            if requires_conversion:
                x = self._cast_input_dtype(x, adapter_dtype)
            if active_adapter in self.lora_variant:  # DoRA: its variant adds to the result
                result = self.lora_variant[active_adapter].forward(
                    self, active_adapter=active_adapter, x=x, result=result
                )
                if requires_conversion:
                    result = result.to(expected_dtype)
                continue
            output = lora_b(lora_a(dropout(x))) * scaling
            if requires_conversion:
                output = output.to(expected_dtype)
            result = result + output
        return result
