"""``memllm experiment``, ``memllm ladder`` and ``memllm quickstart``."""

from __future__ import annotations

from memllm.evaluation.experiment import quickstart_config, run_experiment


def cmd_experiment(args) -> int:
    from memllm.evaluation.markdown import format_table

    arms = args.arms.split(",") if args.arms else None
    experiment, results = run_experiment(args.config, args.overrides, arms, args.shard)
    if experiment.paths is None:  # a shard that left its arms to the others to finish
        print("this shard's answers are saved; the shard that answers the last writes the report")
        return 0
    print(format_table(results))
    print(f"report: {experiment.paths['markdown']}")
    return 0


def cmd_ladder(args) -> int:
    from memllm.evaluation.ladder import run_ladder

    rungs = args.rungs.split(",") if args.rungs else None
    arms = args.arms.split(",") if args.arms else None
    _, paths = run_ladder(args.config, args.overrides, rungs=rungs, arms=arms, shard=args.shard)
    print(paths["markdown"].read_text())
    print(f"report: {paths['markdown']}")
    return 0


def cmd_quickstart(args) -> int:
    from memllm.evaluation.markdown import format_table

    overrides = list(args.overrides)
    if args.output:
        overrides.append(f"output_dir={args.output}")
    arms = args.arms.split(",") if args.arms else None
    experiment, results = run_experiment(quickstart_config(), overrides, arms)
    print(format_table(results))
    print(f"report: {experiment.paths['markdown']}")
    return 0


def _add_shard(parser) -> None:
    parser.add_argument(
        "--shard",
        metavar="K/N",
        help="answer only this process's share of each arm's examples (K of N processes on one "
        "output folder); answers are saved as they come and the shard that answers the last "
        "example writes the arm's result",
    )


def register(sub) -> None:
    p = sub.add_parser("experiment", help="run memory and baseline arms, write a report")
    p.add_argument("--config", required=True, help="experiment config YAML")
    p.add_argument(
        "--arms",
        help="comma-separated subset of the config's arms; the other arms' results already in "
        "the output folder stay in the report when their settings are unchanged",
    )
    _add_shard(p)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    p.set_defaults(func=cmd_experiment)

    p = sub.add_parser(
        "ladder",
        help="the recall ladder: one experiment per rung, then a table of arms x rungs "
        "(ladder.json, ladder.md, ladder.png)",
    )
    p.add_argument("--config", required=True, help="ladder config YAML (an experiment + rungs)")
    p.add_argument("--rungs", help="comma-separated subset of the rungs")
    p.add_argument(
        "--arms",
        help="comma-separated subset of the arms; the other arms' results already in each "
        "rung's folder stay in the reports when their settings are unchanged",
    )
    _add_shard(p)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    p.set_defaults(func=cmd_ladder)

    q = sub.add_parser(
        "quickstart",
        help="the bundled model + BabiLong built offline: the memory chosen on validation vs "
        "baselines (~15 min CPU)",
    )
    q.add_argument("--output", help="output folder (default runs/quickstart)")
    q.add_argument(
        "--arms",
        help="comma-separated subset of the arms (base, window, latent, latent_no_carry, "
        "episodic, episodic_no_carry, kv_retrieval); the others' results already in the output "
        "folder stay in the report when their settings are unchanged",
    )
    q.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    q.set_defaults(func=cmd_quickstart)
