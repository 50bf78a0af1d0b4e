"""A third-party estimator with the mistakes a type checker reports: the linear CKA example plugin
(tests/example_plugin) with a misspelt base-class method, a misspelt parameter, a misspelt state,
an ``update`` with the wrong signature and a misspelt override. Each line that mypy must report ends
with ``# error: [code]``; tests/test_typing.py checks that mypy reports those lines and no others.

Never imported: the mistakes fail only when the estimator runs, which is what type checking spares.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict
from typing_extensions import override

from layerscope import Estimator, TensorBatch
from layerscope.util.lazy import lazy_module

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_module("torch")


class MisspeltParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pool: bool = True


class Misspelt(Estimator):
    name = "misspelt"
    Params = MisspeltParams
    params: MisspeltParams
    sums: dict[str, torch.Tensor]

    def setup(self) -> None:
        self.add_stat("sums", {}, "sum")  # error: [attr-defined]

    def update(self, batch: TensorBatch) -> None:
        for name, values in batch.tensors.items():
            if self.params.pol:  # error: [attr-defined]
                values = values.flatten(2).mean(dim=2)
            self.acumulate("sums", values.sum(0), name)  # error: [attr-defined]
            self.sum[name] += values.sum(0)  # error: [attr-defined]

    @override
    def finalise(self) -> list[dict]:  # error: [misc]
        return [self.record(name, "total", float(total.sum())) for name, total in self.sums.items()]


class WrongUpdate(Estimator):
    name = "wrong_update"

    def update(self, batch: TensorBatch, labels: torch.Tensor) -> None:  # error: [override]
        pass
