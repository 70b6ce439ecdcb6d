"""Train a language model.

    python train.py                                  # the tiny default model on Tiny Shakespeare
    python train.py --preset gpt2-124m --dataset openwebtext
    python train.py --layer_configs_jsonl layer_configs.jsonl --pos_emb rope
    python train.py --help                           # every flag, grouped
"""
import sys

from llm.cli import parse
from llm.config import exit_on_user_error


def main(argv: list[str] | None = None) -> None:
    with exit_on_user_error():
        model_config, train_config = parse(argv)
        from llm.train import train

        train(model_config, train_config)


if __name__ == "__main__":
    main(sys.argv[1:])
