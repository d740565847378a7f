"""python -m model {build,train,export,info} --help"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import logging
import sys
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.errors import ModelError

if TYPE_CHECKING:  # the real imports are lazy: --help must not wait for torch
    from model.build import BuildConfig
    from model.train import TrainConfig

log = logging.getLogger("model")


def field_help(cls: type) -> dict[str, str]:
    """Each field's trailing ``# comment`` in the class source: the config reads as documented
    code on its first screen (nanoGPT style), and --help says the same words."""
    lines, _ = inspect.getsourcelines(cls)
    found = {}
    for line in lines:
        code, _, comment = line.partition("  # ")
        name = code.strip().split(":", 1)[0]
        if comment and name.isidentifier():
            found[name] = comment.strip()
    return found


def add_dataclass_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """One --option per field, typed from its annotation: the dataclass is the one definition."""
    hints = typing.get_type_hints(cls)
    helps = field_help(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        args = typing.get_args(kind) if isinstance(kind, types.UnionType) else ()
        base = next((a for a in args if a is not type(None)), kind)
        if base is bool:
            parser.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=f.default,
                help=helps.get(f.name),
            )
        else:
            text = helps.get(f.name, "")
            parser.add_argument(
                flag,
                type=base,
                default=f.default,
                metavar=f.name.upper(),
                help=text if f.default is None else f"{text} (default: %(default)s)".lstrip(),
            )


def main(argv: list[str] | None = None) -> int:
    from core.contract import PRECISIONS
    from model.build import BuildConfig
    from model.train import TrainConfig

    # No abbreviations: `--epoch 3` must fail, not silently mean --epochs.
    sub: dict[str, Any] = {"allow_abbrev": False}
    parser = argparse.ArgumentParser(prog="python -m model", description=__doc__, **sub)
    commands = parser.add_subparsers(dest="command", required=True)
    add_dataclass_options(
        commands.add_parser("build", help="train/load + export", **sub), BuildConfig
    )
    add_dataclass_options(
        commands.add_parser("train", help="train or fine-tune", **sub), TrainConfig
    )
    exp = commands.add_parser("export", help="checkpoint -> verified ONNX file", **sub)
    exp.add_argument("checkpoint", type=Path)
    exp.add_argument("--out", type=Path, default=Path("artifacts/model.onnx"))
    exp.add_argument("--precision", choices=PRECISIONS, default="fp32")
    exp.add_argument("--eval-data", type=Path, help="labelled ImageFolder for accuracy")
    exp.add_argument("--calib-data", help="int8: ImageFolder or 'digits' (default: training set)")
    exp.add_argument("--version", help="model_version in the metadata (default: sha256 prefix)")
    exp.add_argument("--name", help="model_name in the metadata (default: the checkpoint's)")
    info = commands.add_parser("info", help="print an ONNX artifact's metadata", **sub)
    info.add_argument("model", type=Path)
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    log.setLevel(logging.INFO)
    try:
        return _run(args, BuildConfig, TrainConfig)
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _run(
    args: argparse.Namespace, build_cls: type[BuildConfig], train_cls: type[TrainConfig]
) -> int:
    options = {k: v for k, v in vars(args).items() if k != "command"}
    if args.command == "build":
        from model.build import build

        build(build_cls(**options))
    elif args.command == "train":
        from model.train import train

        train(_resumed(train_cls(**options)))
    elif args.command == "export":
        from model import checkpoint
        from model.evalsets import calibration_for, eval_set_for
        from model.export import export

        ckpt = checkpoint.load(args.checkpoint)
        calibration = calibration_for(ckpt, args.calib_data) if args.precision == "int8" else None
        export(
            ckpt,
            args.out,
            precision=args.precision,
            eval_set=eval_set_for(ckpt, args.eval_data),
            calibration=calibration,
            version=args.version,
            name=args.name,
        )
    else:
        from model.export import read_metadata

        print(json.dumps(read_metadata(_existing(args.model)).to_dict(), indent=2))
    return 0


def _resumed(config: TrainConfig) -> TrainConfig:
    """--resume continues with the interrupted run's own options."""
    if not config.resume:
        return config
    from model import checkpoint

    saved = checkpoint.read_raw(Path(config.resume))
    if not isinstance(saved, dict) or "config" not in saved:
        raise ModelError(f"--resume {config.resume}: not a checkpoint written by `model train`")
    return type(config)(**{**saved["config"], "resume": config.resume})


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise ModelError(f"{path}: no such file")
    return path


if __name__ == "__main__":
    sys.exit(main())
