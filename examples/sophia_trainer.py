"""Sophia (soul.optim.SophiaG) inside a plain `transformers.Trainer`, via soul's Hessian callback.

    python examples/sophia_trainer.py                      # tiny random model, bundled benchmark, CPU, seconds
    python examples/sophia_trainer.py --model smollm2-135m --steps 50

The callback estimates the diagonal Hessian (GNB by default) on the step's micro-batches whenever Sophia's
schedule says it is due (every `--hessian-interval` steps); everything else is the Trainer's own loop.
"""

from __future__ import annotations

import argparse
import tempfile

from transformers import Trainer, TrainingArguments

from soul.data import QACollator, QADataset, load_split
from soul.integrations.transformers import SophiaHessianCallback
from soul.optim import SophiaG


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="'tiny' (random, offline) or a soul model alias / path")
    parser.add_argument("--data", default="bundled", help="'bundled', a directory of TOFU files, or locuslab/TOFU")
    parser.add_argument("--split", default="full")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--rho", type=float, default=0.04)
    parser.add_argument("--hessian-interval", type=int, default=10)
    args = parser.parse_args()

    if args.model == "tiny":
        from soul.testing import tiny_model

        model, tokenizer = tiny_model("llama")
    else:
        from soul.models import load_model

        model, tokenizer = load_model(args.model)
    records = load_split(args.data, args.split)
    dataset = QADataset(records, tokenizer)
    train = [{k: v for k, v in dataset[i].items() if k != "index"} for i in range(len(dataset))]

    optimizer = SophiaG(model.parameters(), lr=args.lr, rho=args.rho, weight_decay=0.0,
                        hessian_interval=args.hessian_interval, estimator="gnb")
    callback = SophiaHessianCallback()
    with tempfile.TemporaryDirectory() as out:
        training_args = TrainingArguments(output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                                          report_to="none", save_strategy="no", logging_steps=5,
                                          use_cpu=args.model == "tiny")
        trainer = Trainer(model=model, args=training_args, train_dataset=train,
                          data_collator=QACollator(tokenizer), optimizers=(optimizer, None), callbacks=[callback])
        result = trainer.train()
    print(f"{args.steps} steps, final training loss {result.training_loss:.4f}, "
          f"{callback.hessian_updates} Hessian estimates")


if __name__ == "__main__":
    main()
