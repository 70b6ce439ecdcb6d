"""python -m llm.formats.convert FILE --out ours.yaml: a config file of any recognised format (transformers
config.json, HELM model config, llm720 YAML, Hydra model config, or ours) written in our own format, which --config
reads back to the same resolved config."""
import argparse
from pathlib import Path

import yaml

from ..config import ConfigError, exit_on_user_error
from . import load_mapping, to_ours


def convert(path: str, lenient: bool = False) -> dict:
    """Our config dict for the file at `path`."""
    return to_ours(path, load_mapping(path), lenient)


def main(argv: list[str] | None = None) -> None:
    """Command line: reads FILE, writes --out (.yaml or .json) in our format."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("file", help="the config file to convert")
    parser.add_argument("--out", required=True, help="where to write our format (.yaml, .yml or .json)")
    parser.add_argument("--lenient", action="store_true", help="print unmappable keys as ignored instead of refusing")
    args = parser.parse_args(argv)
    with exit_on_user_error():
        out = Path(args.out)
        if out.suffix not in (".yaml", ".yml", ".json"):
            raise ConfigError(f"--out={args.out!r}: use a .yaml, .yml or .json file name")
        data = convert(args.file, args.lenient)
        if out.suffix == ".json":
            import json

            text = json.dumps(data, indent=2)
        else:
            text = yaml.safe_dump(data, sort_keys=False)
        out.write_text(text)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
