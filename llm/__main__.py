"""python -m llm: train.py's command (train a language model; every flag of python train.py --help)."""
import sys


def main(argv: list[str] | None = None) -> None:
    """Parses the flags and trains; a user mistake is one line and exit 2, Ctrl-C during start-up exit 130."""
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
