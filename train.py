"""Train a language model.

    python train.py                                  # the tiny default model on Tiny Shakespeare
    python train.py --preset gpt2-124m --dataset openwebtext
    python train.py --layer_configs_jsonl layer_configs.jsonl --pos_emb rope
    python train.py --help                           # every flag, grouped
"""
import sys


def main(argv: list[str] | None = None) -> None:
    try:
        from llm.cli import parse  # imported here, so that Ctrl-C while torch loads is caught too
        from llm.config import exit_on_user_error

        with exit_on_user_error():
            model_config, train_config = parse(argv)
            from llm.train import train

            train(model_config, train_config)
    except KeyboardInterrupt:  # Ctrl-C before the loop took over the signal (while importing or setting up)
        print("interrupted during start-up; nothing was trained", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main(sys.argv[1:])
