"""`EngineShard`: the `ModelShard` of every LLM servable; a model file only names its `EngineModel`.

::

    @register_shard("qwen2")
    class Qwen2Shard(EngineShard):
        model_class = Qwen2Model

Instance outputs: one int64 array of generated token ids (EOS and stop sequences excluded). Streaming pieces
(``link.stream``) carry the new token ids of each step.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from servable_framework.agent.shard import InstanceValues, ModelShard, ShardContext
from servable_framework.engine.model import EngineModel
from servable_framework.engine.runner import GenerationEngine, GenerationResult


class EngineShard(ModelShard):
    """Loads ``model_class`` for this rank and runs every batch through the `GenerationEngine`."""

    model_class: ClassVar[type[EngineModel]]

    def __init__(self, ctx: ShardContext) -> None:
        super().__init__(ctx)
        self.model = self.model_class(ctx)
        self.engine = GenerationEngine(self.model, ctx)

    @property
    def last_results(self) -> dict[Any, GenerationResult]:
        """Output rank: the result of every batch completed by the last call, by batch id."""
        return self.engine.results

    def predict(self, instances: list[InstanceValues] | None) -> list[InstanceValues] | None:
        result = self.generate(instances)
        if result is None:
            return None
        return [[np.asarray(tokens, dtype=np.int64)] for tokens in result.tokens]

    def generate(self, instances: list[InstanceValues] | None, collect_logits: bool = False
                 ) -> GenerationResult | None:
        """Run one batch (and whatever joins it) to completion; its result on the output rank, None elsewhere.
        ``collect_logits`` keeps every step's logits of every row (tests)."""
        self.engine.collect_logits = collect_logits
        batch_id = self.link.batch_id if self.link is not None else 0
        return self.engine.run(batch_id, instances, self.link)

    def close(self) -> None:
        self.model.close()
