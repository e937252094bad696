"""One copy of each base model in a process, with many desks' LoRA adapters on it (for serving many desks).

A weights folder holds only adapters: the base LM (named by its plan) and the base sentence encoder
(`minilm` | `mpnet`) are shared by every desk trained on them. `SharedBases` loads each base once and loads
a desk's adapters onto it under names of its own (`<key>_intent`, `<key>_reply`, `<key>_encoder`), the way
vLLM's `--lora-modules` or Ray Serve LLM's `base:adapter` serve one base model with many adapters. The
caller switches adapters per call (`modeling.adapter`, `IntentEncoder.embed`), so calls on one shared base
must not overlap: the server predicts on one model thread. `release(key)` deletes a desk's adapters (LRU
eviction). Adapter weights are a few MB per desk; the bases are the hundreds of MB that are not repeated.

    >>> bases = SharedBases()
    >>> bases.adapter_names("d1")
    ('d1_intent', 'd1_reply')
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from tickettune.pipeline import modeling
from tickettune.pipeline.plan import Plan

log = logging.getLogger(__name__)


class SharedBases:
    def __init__(self) -> None:
        self._lms: dict[tuple, list] = {}        # plan key -> [PeftModel or bare base, tokenizer]
        self._encoders: dict[str, list] = {}     # encoder choice -> [PeftModel or bare base, tokenizer]
        self._lock = threading.RLock()

    @staticmethod
    def adapter_names(key: str) -> tuple[str, str]:
        """A desk's (intent, reply) adapter names on the shared LM."""
        return f"{key}_intent", f"{key}_reply"

    def lm(self, plan: Plan, folder: str | Path, key: str) -> tuple:
        """(PeftModel with desk `key`'s adapters loaded from `folder`, tokenizer, their names)."""
        from peft import PeftModel

        intent, reply = self.adapter_names(key)
        folder = Path(folder)
        with self._lock:
            slot = self._lms.get(plan_key := (plan.model, plan.device, plan.dtype, plan.method))
            if slot is None:
                slot = self._lms[plan_key] = list(modeling.load_base(plan))
            if isinstance(slot[0], PeftModel):
                slot[0].load_adapter(str(folder), adapter_name=intent)
            else:
                slot[0] = PeftModel.from_pretrained(slot[0], str(folder), adapter_name=intent)
            if (folder / modeling.REPLY_ADAPTER / "adapter_config.json").is_file():
                slot[0].load_adapter(str(folder / modeling.REPLY_ADAPTER), adapter_name=reply)
            slot[0].set_adapter(intent)
            return slot[0].eval(), slot[1], (intent, reply)

    def encoder(self, choice: str, folder: str | Path, key: str) -> tuple:
        """(PeftModel with desk `key`'s intent-encoder adapter from `folder`, tokenizer, its name)."""
        from peft import PeftModel

        from tickettune.pipeline.encoder import load_base_encoder

        name = f"{key}_encoder"
        with self._lock:
            slot = self._encoders.get(choice)
            if slot is None:
                slot = self._encoders[choice] = list(load_base_encoder(choice))
            if isinstance(slot[0], PeftModel):
                slot[0].load_adapter(str(folder), adapter_name=name)
            else:
                slot[0] = PeftModel.from_pretrained(slot[0], str(folder), adapter_name=name)
            slot[0].set_adapter(name)
            return slot[0].eval(), slot[1], name

    def release(self, key: str) -> None:
        """Delete desk `key`'s adapters from every shared base (the last adapter of a base stays: PEFT
        keeps one; it is replaced by name when that desk loads again)."""
        with self._lock:
            for slot in [*self._lms.values(), *self._encoders.values()]:
                model = slot[0]
                mine = [n for n in list(getattr(model, "peft_config", {})) if n.startswith(f"{key}_")]
                for name in mine:
                    if len(model.peft_config) == 1:
                        break
                    if name in (model.active_adapters if hasattr(model, "active_adapters") else []):
                        model.set_adapter(next(n for n in model.peft_config if n != name))
                    model.delete_adapter(name)

    def loaded(self) -> dict[str, list[str]]:
        """Which adapters each base holds now (for logs and tests)."""
        with self._lock:
            return {str(k): sorted(getattr(s[0], "peft_config", {})) for k, s in [*self._lms.items(),
                                                                                 *self._encoders.items()]}
