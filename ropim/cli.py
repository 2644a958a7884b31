"""``ropim pretrain --config FILE [key=value ...] [--resume]``, ``bench-step``, ``methods``."""

from __future__ import annotations

import argparse
import sys

from ropim.errors import CheckpointError, ConfigError, DataError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ropim", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    pre = sub.add_parser("pretrain", help="pre-train one masking method")
    pre.add_argument("--config", "-c", required=True, help="YAML file under configs/")
    pre.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    pre.add_argument(
        "--method-dir", action="append", default=[], help="extra folder holding <method>.py files"
    )
    pre.add_argument("overrides", nargs="*", help="key.sub=value, e.g. train.epochs=5")
    bench = sub.add_parser("bench-step", help="time training steps (images/s, peak memory)")
    bench.add_argument("--config", "-c", required=True)
    bench.add_argument("--steps", type=int, default=10)
    bench.add_argument("--warmup", type=int, default=3)
    bench.add_argument("overrides", nargs="*")
    methods = sub.add_parser("methods", help="list the masking methods that can be selected")
    methods.add_argument("--method-dir", action="append", default=[])
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "methods":
            from ropim.registry import available_methods

            print("\n".join(available_methods(args.method_dir)))
            return 0
        from ropim.config import load_config

        cfg = load_config(args.config, args.overrides)
        if args.command == "bench-step":
            import json

            from ropim.bench import bench_step

            print(json.dumps(bench_step(cfg, args.warmup, args.steps), indent=2))
            return 0
        from ropim.trainer import pretrain

        pretrain(cfg, resume=args.resume, method_dirs=tuple(args.method_dir))
    except (ConfigError, DataError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
