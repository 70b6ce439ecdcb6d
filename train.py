"""Train a language model.

    python train.py                                  # the tiny default model on Tiny Shakespeare
    python train.py --preset gpt2-124m --dataset openwebtext
    python train.py --layer_configs_jsonl layer_configs.jsonl --pos_emb rope
    python train.py --help                           # every flag, grouped
    python -m llm ...                                # the same command, from anywhere
"""
import sys

from llm.__main__ import main

if __name__ == "__main__":
    main(sys.argv[1:])
