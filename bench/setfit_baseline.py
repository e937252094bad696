"""SetFit, the peer a practitioner would pick for few-shot intent, as a baseline for the benches.

Its default recipe (contrastive pairs from the few labelled rows, one epoch, then a logistic-regression
head) on the same sentence-encoder body tickettune embeds with (the run's: MiniLM or mpnet), with one
change: training stops after `seconds` (a callback at each step), the time tickettune's own intent fit
was given, so that the comparison is at equal cost. Unbounded, the default recipe plans 9,144 steps on Banking77 5-shot: hours on 2 cores.
Needs `pip install setfit` (bench only; not a dependency of tickettune).
"""

from __future__ import annotations

import time


def setfit_predict(texts: list[str], labels: list[str], queries: list[str], seconds: float, seed: int) -> list[str]:
    """Train SetFit on (`texts`, `labels`) for at most `seconds`, then predict `queries`' labels."""
    from datasets import Dataset
    from setfit import SetFitModel, Trainer, TrainingArguments
    from transformers import TrainerCallback

    from tickettune.pipeline.embeddings import embedder_path

    class Deadline(TrainerCallback):
        def __init__(self) -> None:
            self.end = time.monotonic() + seconds

        def on_step_end(self, args, state, control, **kwargs):
            if time.monotonic() > self.end:
                control.should_training_stop = True
            return control

    model = SetFitModel.from_pretrained(str(embedder_path()), local_files_only=True)
    args = TrainingArguments(seed=seed, report_to="none", show_progress_bar=False)
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": texts, "label": labels}),
                      callbacks=[Deadline()])
    trainer.train()
    return [str(p) for p in model.predict(queries, as_numpy=True, show_progress_bar=False)]
