"""The ``mmtts`` command: list what exists, run benchmarks, prepare tasks, run the demo."""

from __future__ import annotations

import argparse
import os
import shlex
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing reaches for a model hub

DESCRIPTION = """\
mmtts: multimodal test-time scaling and adaptation.

Spend extra compute at inference to get better outputs from models you already
have: search over diffusion noise and trajectories, sample and verify actions,
vote over predictions, adapt classifiers to shifted data. Every comparison is
made at equal budget (model forwards, verifier calls) over paired seeds.
"""

EPILOG = """\
examples:
  mmtts demo                                   run the embedded default (toy-gmm) and print the table
  mmtts list                                   strategies, adapters, tasks and verifiers
  mmtts bench toy-gmm --seeds 0 1 2 --budgets 20 80 320 --out results/
  mmtts bench image-search --quick --processes 2 --out results/   cells over 2 processes (accelerate)
  mmtts tasks prepare toy-gmm --option model=learned   train and cache a task's reference model
"""


def _parse_options(pairs: list[str] | None) -> dict:
    from .core.errors import MmttsError
    out = {}
    for p in pairs or []:
        if "=" not in p:
            raise MmttsError(f"--option {p!r} must look like key=value")
        k, v = p.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _make_task(name: str, quick: bool = False, options: list[str] | None = None):
    from .core.registry import TASKS  # lazy: the task's module is imported on first use of its name
    return TASKS.create(name, quick=quick, **_parse_options(options))


def cmd_list(args) -> int:
    import mmtts
    kinds = {"strategies": mmtts.list_strategies, "adapters": mmtts.list_adapters, "tasks": mmtts.list_tasks,
             "verifiers": mmtts.list_verifiers}
    chosen = [args.kind] if args.kind else list(kinds)
    for k in chosen:
        names = kinds[k]()
        print(f"{k}: {', '.join(names) if names else '(none yet)'}")
    return 0


def _print_table(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from .bench import interval
    key = results["primary_metric"]
    table = Table(title=f"{results['task']} ({key}: mean ± 95% CI over seeds {results['seeds']})")
    for col in ("setting", "method", "budget", key, "vs baseline"):
        table.add_column(col)
    comps = {(c["setting"], c["method"], c["budget"]): c for c in results["comparisons"]}
    for r in results["rows"]:
        c = comps.get((r["setting"], r["method"], r["budget"]))
        verdict = "baseline" if c is None else f"{c['diff']:+.3g} ± {interval(c['diff_ci95'])} {c['verdict']}"
        table.add_row(r["setting"], r["method"], "-" if r["budget"] is None else str(r["budget"]),
                      f"{r['metrics'][key]:.4g} ± {interval(r['metrics'][key + '_ci95'])}", verdict)
    Console().print(table)


def cmd_bench(args) -> int:
    from .bench import run_benchmark
    from .distributed.comm import launched_world_size
    if args.processes < 1:
        from .core.errors import MmttsError
        raise MmttsError(f"--processes {args.processes}: pass a positive number of processes")
    if args.processes > 1 and launched_world_size() == 1:
        from .distributed.launch import launch_bench
        return launch_bench(args.argv, args.processes, args.out, args.task)
    task = _make_task(args.task, quick=args.quick, options=args.option)
    seeds = args.seeds if args.seeds is not None else list(task.default_seeds)
    budgets = args.budgets
    if budgets is None and task.budget_unit is not None:
        budgets = list(task.quick_budgets if args.quick else task.default_budgets)
    settings = args.settings
    if settings is None and args.quick and task.quick_settings is not None:
        settings = list(task.quick_settings)
    command = "mmtts " + " ".join(shlex.quote(a) for a in args.argv) if args.command is None else args.command
    results = run_benchmark(task, seeds, budgets, methods=args.methods, out=args.out, command=command,
                            settings=settings, resume=args.resume)
    if results is None:  # a worker of a sharded sweep: rank 0 writes the results
        return 0
    _print_table(results)
    print(f"wrote {args.out}/{task.name}.json, .md and .png")
    return 0


def cmd_tasks(args) -> int:
    import mmtts
    if args.action == "list":
        from .core.registry import TASKS
        for name in mmtts.list_tasks():
            print(f"{name}: {TASKS.get(name).description}")
        return 0
    task = _make_task(args.task, quick=args.quick, options=args.option)
    ready = task.prepare()
    print(f"{args.task}: ready ({', '.join(ready) if ready else 'nothing to train'}); cache at {task.cache.root}")
    return 0


def cmd_demo(args) -> int:
    """The embedded default: a quick toy-gmm comparison at equal budget, three paired seeds."""
    from .bench import run_benchmark
    task = _make_task("toy-gmm", quick=True)
    results = run_benchmark(task, [0, 1, 2], list(task.quick_budgets), out=args.out,
                            command=f"mmtts demo --out {args.out}")
    _print_table(results)
    print(f"wrote {args.out}/toy-gmm.json, .md and .png")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmtts", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")

    s = sub.add_parser("list", help="list registered strategies, adapters, tasks and verifiers")
    s.add_argument("kind", nargs="?", choices=["strategies", "adapters", "tasks", "verifiers"])
    s.set_defaults(func=cmd_list)

    s = sub.add_parser("bench", help="run a benchmark task: methods x budgets x seeds -> JSON, markdown, plots")
    s.add_argument("task", help="task name (see `mmtts list tasks`)")
    s.add_argument("--seeds", type=int, nargs="+", help="paired seeds (default: the task's, usually 0 1 2)")
    s.add_argument("--budgets", type=int, nargs="+", help="budgets in the task's unit (default: the task's sweep)")
    s.add_argument("--methods", nargs="+", help="subset of the task's methods (default: all)")
    s.add_argument("--settings", nargs="+", help="subset of the task's settings (default: all)")
    s.add_argument("--out", default="mmtts-results", help="directory for <task>.json/.md/.png (default: %(default)s)")
    s.add_argument("--quick", action="store_true", help="the small version (as run in the test suite)")
    s.add_argument("--option", action="append", metavar="KEY=VALUE", help="task option (repeatable)")
    s.add_argument("--processes", type=int, default=1, metavar="N",
                   help="share the cells out over N processes started with accelerate (default: 1)")
    s.add_argument("--resume", action="store_true",
                   help="run only the cells missing from --out (finished cells are saved as they finish)")
    s.add_argument("--command", help=argparse.SUPPRESS)
    s.set_defaults(func=cmd_bench)

    s = sub.add_parser("tasks", help="list tasks or prepare one (train and cache its reference models)")
    tsub = s.add_subparsers(dest="action", metavar="ACTION", required=True)
    t = tsub.add_parser("list", help="tasks with their descriptions")
    t.set_defaults(func=cmd_tasks)
    t = tsub.add_parser("prepare", help="train and cache a task's reference models ahead of time")
    t.add_argument("task")
    t.add_argument("--option", action="append", metavar="KEY=VALUE", help="task option (repeatable)")
    t.add_argument("--quick", action="store_true", help="the small models of the quick version (as in the tests)")
    t.set_defaults(func=cmd_tasks)

    s = sub.add_parser("demo", help="run the embedded default: toy-gmm, best-of-N vs particle filter vs beam")
    s.add_argument("--out", default="mmtts-demo", help="directory for the results (default: %(default)s)")
    s.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one command; Ctrl-C at any point (torch still importing included) exits quietly with 130."""
    try:
        return _run(argv)
    except KeyboardInterrupt:
        print("mmtts: interrupted", file=sys.stderr)
        return 130


def _run(argv: list[str] | None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    from .core.errors import MmttsError  # imports torch: inside main, so Ctrl-C during it is caught
    try:
        return args.func(args)
    except MmttsError as e:
        print(f"mmtts: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
