"""The ``layerscope`` command: run, validate, trace, plugins, inspect, report, compare, cache.

Exit codes: 0 success, 2 user error (one message, no traceback), 3 infrastructure failure (workers or a
Ray cluster lost beyond ``runtime.retries``; one message), 1 internal error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

from layerscope.util.errors import InfrastructureError, UserError
from layerscope.util.processes import Terminated, ignore_late_signals, terminated_by_exception

from . import supervisor
from .supervisor import INTERRUPTED, RESUME_HINT

EXIT_OK, EXIT_INTERNAL, EXIT_USER, EXIT_INFRASTRUCTURE = 0, 1, 2, 3
EXIT_BROKEN_PIPE = 141  # as a process killed by SIGPIPE


def _cmd_run(args) -> int:
    from layerscope.api import run

    with terminated_by_exception():
        results = run(args.spec, out=args.out, progress=not args.quiet, resume=args.resume)
    if args.as_command:  # the results are written: the run has succeeded whatever signal comes now
        ignore_late_signals()
    from .summary import print_summary

    print_summary(results, results.out_dir, quiet=args.quiet)
    return EXIT_OK


def _cmd_validate(args) -> int:
    from layerscope.api import validate

    for line in validate(args.spec, with_model=not args.no_model):
        print(f"ok: {line}")
    return EXIT_OK


def _cmd_trace(args) -> int:
    from layerscope.api import prepare_trace
    from layerscope.engine.progress import Progress
    from layerscope.engine.trace import trace_to_file
    from layerscope.graph.selectors import parse_selection
    from layerscope.spec.yaml_locations import load_yaml
    from layerscope.util.units import format_bytes

    out = Path(args.out)
    if out.suffix != ".npz":
        raise UserError(f"--out: {args.out} must name an .npz file (NumPy's archive of named arrays)")
    written_on = load_yaml(args.on, "--on").data  # bad YAML: "--on:1:5: invalid YAML: …"
    try:
        selector = parse_selection(written_on)
    except UserError as error:
        raise UserError(f"--on: {error}") from None
    plan = prepare_trace(args.spec)
    with Progress(len(plan.order), "tracing", enabled=not args.quiet) as progress:
        written = trace_to_file(plan, selector, "--on", out, progress)
    size = format_bytes(out.stat().st_size)
    tensors = f"{len(written)} tensor{'s' if len(written) != 1 else ''}"
    print(f"{tensors} of {len(plan.order)} samples → {out} ({size})")
    for name, (layer, shape, dtype) in written.items():
        print(f"  {name}  (layer {layer})  {dtype} {'×'.join(map(str, shape))}")
    return EXIT_OK


def _cmd_plugins(args) -> int:
    from layerscope.host.loader import load_plugins

    host = load_plugins()
    if args.name is None:
        described = host.describe()
    else:
        from layerscope.host.describe import describe_name

        described = describe_name(host, args.name)
    if args.json or not (args.table or sys.stdout.isatty()):
        print(json.dumps(described, indent=2, default=str))
        return EXIT_OK
    from layerscope.host.describe import print_contribution, print_plugins_table

    if args.name is None:
        print_plugins_table(described)
    else:
        for contribution in described:
            print_contribution(contribution)
    return EXIT_OK


def _cmd_inspect(args) -> int:
    from .inspect import inspect_model

    inspect_model(args.model, as_json=args.json, show_all=args.all)
    return EXIT_OK


def _cmd_report(args) -> int:
    from layerscope.host.loader import load_plugins
    from layerscope.results.contract import Results
    from layerscope.results.outputs import output_folder
    from layerscope.results.reporter import TrackingReporter, check_reporters
    from layerscope.spec.schema import OutputsSection

    results = Results.load(args.run_dir)
    host = load_plugins()
    written = (results.spec.get("outputs") or {}).get(
        "formats"
    ) or OutputsSection().formats  # a run's own, or the default
    # the run's files; its trackers logged it already, and log it again only when --formats names them
    written = [f for f in written if not (f in host.reporters and issubclass(host.reporters.get(f), TrackingReporter))]
    reporters = _reporters(host, args.formats, written)
    with output_folder(Path(args.run_dir)) as folder:
        check_reporters(reporters, folder.path, "--formats")
        rebuilt = folder.write(results, reporters, add=True)
    print(f"reports rebuilt in {args.run_dir}: {', '.join(['results.json', *rebuilt])}")
    for logged in results.logged_to:
        print(f"logged → {logged}")
    return EXIT_OK


def _cmd_compare(args) -> int:
    from layerscope.host.loader import load_plugins
    from layerscope.results.compare import combine, run_labels
    from layerscope.results.contract import Results
    from layerscope.results.outputs import output_folder

    folders = [Path(folder) for folder in args.run_dirs]
    if Path(args.out).resolve() in {folder.resolve() for folder in folders}:
        raise UserError(
            f"--out: {args.out} is one of the runs compared; give another folder (its files would be replaced)"
        )
    runs = [Results.load(folder) for folder in folders]
    combined = combine(runs, run_labels(runs, folders))
    host = load_plugins()
    reporters = _reporters(host, args.formats, ["plots", "html"])
    combined.spec["outputs"] = {"formats": ["json", *(reporter.name for reporter in reporters)]}  # for `report`
    with output_folder(Path(args.out)) as folder:
        folder.write(combined, reporters)
    print(f"{len(runs)} runs compared in {args.out}: {', '.join(['results.json', *combined.artifacts])}")
    return EXIT_OK


def _cmd_cache(args) -> int:
    from . import cache

    if args.action == "prune":
        cache.prune_cache(args.older_than, args.max_size, dry_run=args.dry_run)
    elif args.action == "clear":
        cache.clear_cache(dry_run=args.dry_run)
    else:
        cache.list_cache(as_json=getattr(args, "json", False))
    return EXIT_OK


def _reporters(host, chosen: str | None, default: list[str]) -> list:
    """The reporters named by ``--formats`` (comma-separated), else by *default*; json is always written."""
    from layerscope.results.contract import RESULTS_FORMAT

    names = [f.strip() for f in chosen.split(",") if f.strip()] if chosen is not None else default
    try:
        chosen_classes = [host.reporters.get(name) for name in dict.fromkeys(names) if name != RESULTS_FORMAT]
    except UserError as error:
        raise UserError(f"--formats: {error}") from None
    for reporter in chosen_classes:
        if missing := reporter.missing():
            raise UserError(f"--formats: {missing}")
    return [reporter(host) for reporter in chosen_classes]


class _PrintVersion(argparse.Action):
    """``--version``: layerscope's version, then the onnxruntime that runs the models and the pip package that
    installed it (``onnxruntime-gpu`` or the CPU build ``onnxruntime``); looked up only when asked for."""

    def __call__(self, parser, namespace, values, option_string=None):
        from layerscope import __version__
        from layerscope.graph.ort_package import installed_onnxruntime

        print(f"layerscope {__version__}\n{installed_onnxruntime()}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="layerscope", description="Measure what happens inside deep neural networks.")
    parser.add_argument(
        "--version", action=_PrintVersion, nargs=0, help="the version, and the onnxruntime package that runs models"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the analyses of a spec and write results")
    run.add_argument("spec", help="YAML spec file")
    run.add_argument("--out", help="output folder (overrides outputs.dir)")
    run.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bar and no summary table: only warnings, errors and where the results are",
    )
    run.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted multi-checkpoint run from the checkpoints it already finished",
    )
    run.set_defaults(handler=_cmd_run)

    validate = commands.add_parser(
        "validate",
        help="check a spec: YAML, keys and types, plugin names and parameters, "
        "and (loading the model) that every selector matches at least one tensor",
    )
    validate.add_argument("spec")
    validate.add_argument("--no-model", action="store_true", help="skip the checks that need the model")
    validate.set_defaults(handler=_cmd_validate)

    trace = commands.add_parser(
        "trace",
        help="write the tensors a selector picks, for every sample of the spec's data, to an .npz "
        "(one array per tensor, keyed by tensor name)",
    )
    trace.add_argument("spec", help="YAML spec file (its model, data and runtime are read; analyses are not needed)")
    trace.add_argument(
        "--on", required=True, help="the selector, in YAML or JSON: '{layer: features.3}', '[{glob: \"fc*\"}]', all"
    )
    trace.add_argument("--out", required=True, help="the .npz file to write")
    trace.add_argument("--quiet", action="store_true", help="no progress bar")
    trace.set_defaults(handler=_cmd_trace)

    plugins = commands.add_parser(
        "plugins",
        help="list the loaded plugins (package, version, module, contributions), or describe one "
        "estimator, data source, adapter or reporter: parameters, defaults, a spec snippet",
    )
    plugins.add_argument("name", nargs="?", help="an estimator, data source, adapter, reporter or plugin")
    output = plugins.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="JSON (the default when output is not a terminal)")
    output.add_argument("--table", action="store_true", help="readable tables (the default on a terminal)")
    plugins.set_defaults(handler=_cmd_plugins)

    inspect = commands.add_parser("inspect", help="list a model's tensors: op type, layer, shape, observability")
    inspect.add_argument("model", help="a model source, as in model.source (file or demo:NAME)")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a table")
    inspect.add_argument("--all", action="store_true", help="include constants and shape arithmetic")
    inspect.set_defaults(handler=_cmd_inspect)

    report = commands.add_parser(
        "report",
        help="rebuild the reports of a run from its results.json, or write other formats (--formats html,plots)",
    )
    report.add_argument("run_dir")
    report.add_argument("--formats", help="comma-separated reporters to write (default: the run's outputs.formats)")
    report.set_defaults(handler=_cmd_report)

    compare = commands.add_parser(
        "compare", help="draw several runs in the same figures (and one report), each run labelled by its spec's name"
    )
    compare.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    compare.add_argument("--out", required=True, help="folder for the combined results.json, plots and report")
    compare.add_argument("--formats", help="comma-separated reporters (default: plots,html)")
    compare.set_defaults(handler=_cmd_compare)

    cache = commands.add_parser(
        "cache",
        help="list the cache folder ($LAYERSCOPE_CACHE, default ~/.cache/layerscope): exports, demo models, data and "
        "tables with their sizes and last use; prune or clear it",
    )
    actions = cache.add_subparsers(dest="action", metavar="{list,prune,clear}")
    listing = actions.add_parser("list", help="every entry with its size and last use (the default)")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    prune = actions.add_parser(
        "prune",
        help="remove the entries last used longer ago than --older-than, then the least recently used until the "
        "cache holds at most --max-size",
    )
    prune.add_argument("--older-than", metavar="AGE", help="e.g. 30d, 12h or 2w (s, m, h, d, w)")
    prune.add_argument("--max-size", metavar="SIZE", help="e.g. 2GB or 500MiB")
    prune.add_argument("--dry-run", action="store_true", help="say what would be removed, remove nothing")
    clear = actions.add_parser("clear", help="remove every entry (but writes in progress)")
    clear.add_argument("--dry-run", action="store_true", help="say what would be removed, remove nothing")
    cache.set_defaults(handler=_cmd_cache)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command *argv* (default: this process's arguments); its exit status. As the command itself,
    a run of a Ray spec runs in a watched child process (:mod:`layerscope.cli.supervisor`)."""
    args = build_parser().parse_args(argv)
    args.as_command = argv is None
    # only as the command itself: watching a child changes how the process treats orphans and signals
    if args.as_command and args.handler is _cmd_run and supervisor.wanted(args.spec):
        return supervisor.supervise(sys.argv[1:])
    code = _handled(args)
    supervisor.report_exit(code)
    return code


def _handled(args) -> int:
    """Run the command of *args*; its exit status, with one message for every error (module docstring)."""
    try:
        return args.handler(args)
    except UserError as error:
        print(f"layerscope: error: {error}", file=sys.stderr)
        return EXIT_USER
    except InfrastructureError as error:
        print(
            f"layerscope: infrastructure failure: {error}; no results.json was written ({RESUME_HINT})", file=sys.stderr
        )
        return EXIT_INFRASTRUCTURE
    except BrokenPipeError:  # the reader stopped reading (`layerscope plugins | head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except (KeyboardInterrupt, Terminated) as stopped:
        return _stopped(stopped)
    except Exception as error:
        signalled = _stopped_by(error)
        if signalled is not None:  # a signal while a C extension initialised: onnxruntime's ImportError
            return _stopped(signalled)
        traceback.print_exc()
        print(
            "layerscope: internal error (a bug in layerscope or a plugin); please report it with the traceback above",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


def _stopped(stopped: KeyboardInterrupt | Terminated) -> int:
    """The message and exit status of a run that a signal stopped."""
    if isinstance(stopped, Terminated):
        print(f"layerscope: ended by {stopped}; no results.json was written ({RESUME_HINT})", file=sys.stderr)
        return 128 + stopped.signum
    print(INTERRUPTED, file=sys.stderr)
    return 130


def _stopped_by(error: BaseException) -> KeyboardInterrupt | Terminated | None:
    """The ``KeyboardInterrupt`` or :class:`Terminated` among the exceptions that *error* was raised from or
    while handling, if any."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, KeyboardInterrupt | Terminated):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


if __name__ == "__main__":
    sys.exit(main())
