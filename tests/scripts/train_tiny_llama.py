"""An ordinary Trainer script that knows nothing of anon_hf: HfArgumentParser(TrainingArguments) + Trainer.

Trains a tiny Llama built from a config on synthetic tokens and writes, per rank, ``result_rank{R}.json`` in
``--output_dir`` with what the test checks (the optimizer class inside the Trainer, its param groups, the log
history). Run it as ``anon-hf run tests/scripts/train_tiny_llama.py --optim anon --output_dir DIR ...``.
"""

import json
import os

import torch
from transformers import HfArgumentParser, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, size: int = 64, length: int = 16, vocab: int = 256):
        generator = torch.Generator().manual_seed(1234)
        self.ids = torch.randint(0, vocab, (size, length), generator=generator)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def main():
    (args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses()
    torch.manual_seed(args.seed)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
    )
    trainer = Trainer(model=LlamaForCausalLM(config), args=args, train_dataset=TokenDataset())
    trainer.train()
    optimizer = trainer.optimizer
    while not isinstance(optimizer, torch.optim.Optimizer) or hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    result = {
        "optimizer": type(optimizer).__name__,
        "optim": str(getattr(args.optim, "value", args.optim)),
        "groups": [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups],
        "callbacks": [type(c).__name__ for c in trainer.callback_handler.callbacks],
        "log_history": trainer.state.log_history,
        "world_size": args.world_size,
    }
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, f"result_rank{args.process_index}.json"), "w") as f:
        json.dump(result, f, default=str)
    if torch.distributed.is_initialized():  # as a careful script ends: gloo can abort at exit otherwise
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
