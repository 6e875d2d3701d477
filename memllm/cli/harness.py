"""``memllm eval-harness``: lm-evaluation-harness tasks on a backbone with memory.

::

    memllm eval-harness --model smollm2-135m --memory runs/mem/final --tasks hellaswag \\
        [--segment-length 512] [--include-path DIR] [--limit N] [--output results.json]

Runs the harness's tasks with :class:`memllm.evaluation.harness.MemllmLM` (every input read
segment by segment, the earlier segments through the memory) and writes the harness's usual
results JSON. Needs ``pip install 'memllm[harness]'``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from memllm.cli.args import DTYPES, device, positive_int
from memllm.core.backbone import DEFAULT_MODEL
from memllm.errors import ConfigError, MemllmError

log = logging.getLogger(__name__)


def _harness():
    try:
        import lm_eval

        from memllm.evaluation import harness
    except ImportError as err:
        raise MemllmError(
            f"eval-harness needs lm-evaluation-harness ({err.name or err}): "
            "pip install 'memllm[harness]'"
        ) from None
    return lm_eval, harness


def cmd_eval_harness(args) -> int:
    lm_eval, harness = _harness()
    from lm_eval.tasks import TaskManager

    tasks = [t for item in args.tasks for t in item.split(",") if t]
    if args.include_path and not Path(args.include_path).is_dir():
        raise ConfigError(f"--include-path {args.include_path}: not a folder")
    try:
        metadata = json.loads(args.metadata) if args.metadata else {}
    except json.JSONDecodeError as err:
        raise ConfigError(f"--metadata: not JSON ({err.msg})") from None
    if not isinstance(metadata, dict):
        raise ConfigError("--metadata: expected a JSON object")
    # as lm_eval does with --model_args: tasks that tokenize (ruler) read the model's name here
    metadata = {"pretrained": args.model, **metadata}
    manager = None
    if args.include_path:
        # indexing the harness's thousands of built-in tasks takes seconds: skip it when the
        # local folder has every task asked for
        manager = TaskManager(
            include_path=args.include_path, include_defaults=False, metadata=metadata
        )
        if not set(tasks) <= set(manager.all_tasks):
            manager = None
    manager = manager or TaskManager(include_path=args.include_path, metadata=metadata)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(
            f"--tasks: unknown harness task(s) {', '.join(unknown)} "
            "(`lm_eval ls tasks` lists them; local YAML tasks need --include-path)"
        )
    lm = harness.MemllmLM(
        pretrained=args.model,
        memory=args.memory,
        segment_length=args.segment_length,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        max_gen_toks=args.max_gen_toks,
    )
    # the harness's own seeds unless --seed says otherwise
    names = ("random_seed", "numpy_random_seed", "torch_random_seed", "fewshot_random_seed")
    seeds = {} if args.seed is None else dict.fromkeys(names, args.seed)
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        num_fewshot=args.num_fewshot,
        limit=args.limit,
        task_manager=manager,
        log_samples=args.log_samples,
        metadata=metadata,
        **seeds,
    )
    if results is None:  # a non-zero rank in a distributed run
        return 0
    results["config"]["model"] = "memllm"
    results["config"]["model_args"] = lm.get_model_info()
    from lm_eval.utils import make_table

    print(make_table(results))
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
        print(f"wrote {out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "eval-harness",
        help="run lm-evaluation-harness tasks with memory (needs memllm[harness])",
        description="Run lm-evaluation-harness tasks on a backbone with memory: every input is "
        "read segment by segment, the earlier segments through the memory. Writes the "
        "harness's results JSON.",
    )
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"alias, local folder, .gguf file or hub id (default: {DEFAULT_MODEL}, bundled)",
    )
    p.add_argument(
        "--memory",
        help="a checkpoint folder, or a memory config YAML (untrained); none: the bare model",
    )
    p.add_argument("--tasks", nargs="+", required=True, help="harness task names (or a,b,c)")
    p.add_argument("--include-path", help="a folder of extra task YAML files")
    p.add_argument(
        "--metadata",
        help='task metadata as JSON, e.g. \'{"max_seq_lengths": "0k,4k"}\' for babilong',
    )
    p.add_argument("--limit", type=positive_int, help="at most N documents per task")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples per prompt")
    p.add_argument(
        "--segment-length",
        type=positive_int,
        default=None,
        help="tokens per segment (default: the backbone's context)",
    )
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument(
        "--max-gen-toks", type=positive_int, default=256, help="when a task does not say"
    )
    p.add_argument(
        "--dtype", default="float32", choices=DTYPES, help="weights dtype (default float32)"
    )
    p.add_argument("--device", type=device, default=None, help="cpu, cuda, cuda:1 ...")
    p.add_argument("--seed", type=int, default=None, help="every seed (default: the harness's)")
    p.add_argument("--log-samples", action="store_true", help="keep every sample in the JSON")
    p.add_argument("--output", help="write the results JSON here")
    p.set_defaults(func=cmd_eval_harness)
