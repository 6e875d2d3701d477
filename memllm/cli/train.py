"""``memllm train`` and ``memllm config show``."""

from __future__ import annotations

from memllm.training.run_config import load_run_config, render_with_help
from memllm.training.trainer import train


def cmd_train(args) -> int:
    cfg = load_run_config(args.config, args.overrides)
    result = train(cfg, source=args.config, resume=args.resume)
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return 0
    s = result.summary
    best = (
        f", best {s['metric']} {s['best_metric']:.4f} at step {s['best_step']}"
        if s["best_metric"] is not None
        else ""
    )
    print(f"trained {s['steps']} steps{best}; memory in {result.output_dir / 'final'}")
    return 0


def cmd_config_show(args) -> int:
    cfg = load_run_config(args.file, args.overrides)
    print(f"# {args.file}" + (f" with {' '.join(args.overrides)}" if args.overrides else ""))
    print(render_with_help(cfg), end="")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a memory (and LoRA) on a frozen backbone from a run config",
        description="Train from a YAML run config; key=value arguments override it "
        "(e.g. train.max_steps=100 output_dir=runs/x). An existing output folder resumes.",
    )
    p.add_argument("--config", required=True, help="run config YAML")
    p.add_argument(
        "--resume", action="store_true", help="require and continue the latest checkpoint"
    )
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    p.set_defaults(func=cmd_train)

    config = sub.add_parser("config", help="inspect run configs")
    config_sub = config.add_subparsers(dest="config_command", metavar="SUBCOMMAND")
    show = config_sub.add_parser("show", help="print the resolved config with each field's help")
    show.add_argument("file", help="run config YAML")
    show.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    show.set_defaults(func=cmd_config_show)
    config.set_defaults(func=lambda _args: config.print_help() or 1)
