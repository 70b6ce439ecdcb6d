"""Export a checkpoint as a transformers model directory (config.json, model.safetensors, tokenizer files).

    python -m llm.export --ckpt out/run --out hf/run
    python -m llm.export --ckpt out/run --out hf/run --overwrite    # replace an earlier export
    python -c "import transformers; transformers.AutoModelForCausalLM.from_pretrained('hf/run')"
"""
import base64
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import tyro

from .checkpoint import load_trained
from .config import ConfigError, exit_on_user_error
from .data.tokenizers import END_OF_TEXT, SEQUENCE_TOKENIZERS, GPT2Tokenizer, tokenizer_from_meta
from .hf import to_hf
from .plugins import Imports, import_modules


@dataclass
class ExportArgs:
    """Write a checkpoint as a transformers model directory."""

    ckpt: str
    """A run folder (its best checkpoint, else its newest) or a checkpoint folder."""
    out: str
    """The directory to write; it must not exist or be empty, unless --overwrite."""
    overwrite: bool = False
    """Replace the --out directory when it already holds files."""
    imports: Imports = field(default_factory=list)
    """--import MODULE (repeatable): a module to import first, e.g. one that registers kinds of its own with
    llm.model.register_arch; looked up on sys.path and in the working directory."""


def save_gpt2_tokenizer(out: Path) -> None:
    """tokenizer.json (and its config) for tiktoken's GPT-2 BPE, built offline from the ranks tiktoken already has."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    encoding = GPT2Tokenizer().encoding
    with tempfile.TemporaryDirectory() as tmp:
        ranks = Path(tmp) / "r50k_base.tiktoken"
        ranks.write_text("".join(f"{base64.b64encode(token).decode()} {rank}\n"
                                 for token, rank in encoding._mergeable_ranks.items()))
        converted = TikTokenConverter(str(ranks), pattern=encoding._pat_str, extra_special_tokens=[END_OF_TEXT]).converted()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=converted, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT,
                                        unk_token=END_OF_TEXT)
    tokenizer.save_pretrained(out)


def export(ckpt: str, out: str, overwrite: bool = False) -> Path:
    """Writes the checkpoint as a transformers directory and returns its path. A non-empty `out` is refused, or
    replaced with `overwrite` (once the model has converted, and never when it holds the checkpoint)."""
    target = Path(out)
    if target.exists() and not target.is_dir():
        raise ConfigError(f"--out={out} is a file; pass a directory")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise ConfigError(f"--out={out} exists and is not empty; pass --overwrite to replace it, or another --out")
    folder, model, tokenizer = load_trained(ckpt)
    if tokenizer["tokenizer"] in SEQUENCE_TOKENIZERS:  # sequences run from their begin to their end token
        sequences = tokenizer_from_meta(tokenizer)
        bos, eos = sequences.bos, sequences.eos
    else:
        bos = eos = tokenizer.get("eot")
    hf = to_hf(model, bos, eos)
    for name in model.head_addons:
        print(f"note: the head add-on {name!r} is training-only and is left out of the export")
    if target.is_dir():
        if target.resolve() in (folder.resolve(), *folder.resolve().parents):
            raise ConfigError(f"--out={out} holds the checkpoint {folder}, which --overwrite would delete; "
                              "pass another --out")
        shutil.rmtree(target)
    hf.save_pretrained(target)
    if tokenizer["tokenizer"] == "gpt2":
        save_gpt2_tokenizer(target)
    print(f"wrote {target} ({type(hf).__name__}"
          f"{', GPT-2 tokenizer' if tokenizer['tokenizer'] == 'gpt2' else '; no tokenizer files for ' + tokenizer['tokenizer']})")
    return target


def main(argv: list[str] | None = None) -> None:
    args = tyro.cli(ExportArgs, args=argv, use_underscores=True, prog="python -m llm.export")
    with exit_on_user_error():
        import_modules(args.imports)
        export(args.ckpt, args.out, args.overwrite)


if __name__ == "__main__":
    main(sys.argv[1:])
