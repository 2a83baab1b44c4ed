"""The `borahub` command line. User errors print one line each and exit 2; never a traceback."""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

USER_ERROR = 2


def _tasks_arg(value: str | None) -> list[str] | None:
    return [t.strip() for t in value.split(",") if t.strip()] if value else None


def _tau_arg(value: str):
    from tasks.schema import PriorSpec

    try:
        return PriorSpec(tau=value).tau
    except Exception:  # noqa: BLE001 - pydantic's message is reworded here
        raise argparse.ArgumentTypeError(
            f"must be a number >= 0, 'shared', 'auto' or 'search' (got {value!r})") from None


def cmd_tasks_validate(args) -> int:
    from models.registry import ADAPTERS
    from tasks.registry import load_config

    cfg = load_config(args.config, ADAPTERS.keys())
    print(f"{args.config}: OK ({len(cfg.tasks)} tasks, base_model {cfg.base_model}, tau {cfg.prior.tau})")
    return 0


def cmd_tasks_list(args) -> int:
    from hub.workspace import Workspace

    cfg = Workspace(args.config).cfg
    rows = []
    for t in cfg.tasks:
        a = cfg.adapter_of(t)
        src = "-" if t.data is None else (t.data.bbc_news and f"bbc_news:{t.data.bbc_news}"
                                          or t.data.hub and f"hub:{t.data.hub}" or t.data.path)
        rows.append({"name": t.name, "adapter": a.type, "rank": a.rank, "group": a.group_key(), "data": src,
                     "hiddenkey": t.hiddenkey is not None, "gmt": t.gmt is not None})
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        _table(rows, ["name", "adapter", "rank", "data"])
    return 0


def cmd_tasks_add(args) -> int:
    from models.registry import ADAPTERS
    from tasks.registry import add_tasks

    added = add_tasks(args.config, args.fragment, ADAPTERS.keys())
    print(f"added {len(added)} task(s) to {args.config}: {', '.join(added)}")
    return 0


def cmd_train(args) -> int:
    from hub.workspace import Workspace

    ws = Workspace(args.config)
    report = ws.train(_tasks_arg(args.tasks), steps=args.steps, tau=args.tau, resume=args.resume,
                      progress=not args.quiet)
    if not report.main_process:
        return 0
    print(f"trained {report.steps - report.start_step} steps (from step {report.start_step}) in "
          f"{report.seconds:.1f}s, {report.tokens_per_s:.0f} tokens/s, last NLL {report.last_nll:.3f}; "
          + (f"{report.clipped_steps} steps clipped to max_grad_norm; " if ws.cfg.training.max_grad_norm else "")
          + f"store: {ws.store}")
    return 0


def cmd_eval(args) -> int:
    from hub.workspace import Workspace

    ws = Workspace(args.config)
    res = ws.evaluate(_tasks_arg(args.tasks), split=args.split, max_docs=args.max_docs)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        rows = [{"task": n, "perplexity": f"{r['perplexity']:.2f}", "base": f"{r['base_perplexity']:.2f}",
                 "docs": r["docs"], "train": r["n_train"]} for n, r in res.items()]
        mean = sum(r["perplexity"] for r in res.values()) / max(len(res), 1)
        mean_b = sum(r["base_perplexity"] for r in res.values()) / max(len(res), 1)
        rows.append({"task": "mean", "perplexity": f"{mean:.2f}", "base": f"{mean_b:.2f}", "docs": "", "train": ""})
        print(f"held-out ({args.split}) perplexity per task; 'base' = the frozen model without adapters")
        _table(rows, ["task", "perplexity", "base", "docs", "train"])
    return 0


def cmd_export(args) -> int:
    from hub import store
    from hub.workspace import Workspace

    ws = Workspace(args.config)
    mtm, _ = ws.trained_model()
    from hub.route import GLOBAL_NAME, global_id

    if args.task not in [*mtm.task_names, GLOBAL_NAME]:
        raise store.StoreError(f"export: unknown task {args.task!r} (stored: {', '.join(mtm.task_names)}; "
                               f"{GLOBAL_NAME} = the global adapter)")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise store.StoreError(f"--out {out}: exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not args.force:
        raise store.StoreError(f"--out {out}: folder is not empty (use --force to overwrite)")
    store.write_peft(mtm, global_id(args.task, mtm), out)
    print(f"exported {args.task} as a PEFT LoRA adapter to {out}")
    return 0


def _table(rows: list[dict], cols: list[str]) -> None:
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) if rows else len(c) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    print("  ".join("-" * widths[c] for c in cols))
    for r in rows:
        print("  ".join(str(r[c]).ljust(widths[c]) for c in cols))


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (`borahub: error: ...`, exit 2) instead of usage + error."""

    def error(self, message: str):
        self.exit(USER_ERROR, f"borahub: error: {self.prog.removeprefix('borahub ')}: {message} (see --help)\n")


def _global_options(p: argparse.ArgumentParser, default) -> None:
    from tasks.schema import DEVICES, PRECISIONS

    p.add_argument("--config", default=default("tasks.yaml"), help="task registry (default: ./tasks.yaml)")
    p.add_argument("--device", choices=DEVICES, default=default(None),
                   help="where the base model runs (default: training.device)")
    p.add_argument("--precision", choices=PRECISIONS, default=default(None),
                   help="the frozen base's precision (default: training.precision)")


def _config_everywhere(parser: argparse.ArgumentParser) -> None:
    """Accept the global options after the command too (`borahub tasks validate --config x.yaml`), as users
    type them."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _global_options(sub, lambda _: argparse.SUPPRESS)
                _config_everywhere(sub)


def build_parser() -> argparse.ArgumentParser:
    from hub.router_cli import _positive  # the CLI's checked argument types live there (no torch import)

    p = _Parser(prog="borahub", description="Multi-task adapter hub with a BoRA prior.")
    _global_options(p, lambda value: value)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    tasks = sub.add_parser("tasks", help="the task registry").add_subparsers(dest="tasks_command", required=True,
                                                                             parser_class=_Parser)
    tasks.add_parser("validate", help="check tasks.yaml; list every error").set_defaults(func=cmd_tasks_validate)
    tl = tasks.add_parser("list", help="registered tasks")
    tl.add_argument("--json", action="store_true")
    tl.set_defaults(func=cmd_tasks_list)
    ta = tasks.add_parser("add", help="register the tasks of a YAML fragment")
    ta.add_argument("fragment")
    ta.set_defaults(func=cmd_tasks_add)

    tr = sub.add_parser("train", help="train task adapters jointly under the BoRA prior")
    tr.add_argument("--tasks", help="comma-separated subset to train; the others and Theta stay frozen")
    tr.add_argument("--steps", type=_positive, help="optimiser steps (default: training.steps)")
    tr.add_argument("--tau", type=_tau_arg, help="prior precision: a number >= 0, 'shared', 'auto' (learned in "
                    "the run) or 'search' (chosen on validation over several runs)")
    tr.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    tr.add_argument("--quiet", action="store_true", help="no progress bar")
    tr.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="held-out perplexity per task")
    ev.add_argument("--tasks")
    ev.add_argument("--split", choices=["test", "validation"], default="test")
    ev.add_argument("--max-docs", type=_positive, help="documents per task (default: training.eval_docs)")
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(func=cmd_eval)

    ex = sub.add_parser("export", help="write one task's adapter in another format")
    ex.add_argument("task", help="a task, or _global for the global adapter Theta")
    ex.add_argument("--format", choices=["peft"], default="peft")
    ex.add_argument("--out", required=True)
    ex.add_argument("--force", action="store_true")
    ex.set_defaults(func=cmd_export)

    # command modules: each adds its subcommands with add_commands(sub)
    importlib.import_module("hub.remote_cli").add_commands(sub)
    importlib.import_module("hub.router_cli").add_commands(sub)
    importlib.import_module("hub.serve_cli").add_commands(sub)
    _config_everywhere(p)
    return p


def one_job(args) -> bool:
    """Whether the command is one job that ends (train, eval, generate, ...), not a long-lived service. A service
    keeps the system allocator: retaining freed memory would hold its peak heap for its whole life, and `serve`
    measured no faster with it (4 clients: 20.6-21.1 tokens/s against 23.2-23.7 with the system's; 16: the same)."""
    return not getattr(args, "long_lived", False)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from models.allocator import retain_freed_memory
    from models.device import ENV

    if one_job(args):  # reuse freed tensors' memory instead of page-faulting it anew (models/allocator.py)
        retain_freed_memory()

    saved = {var: os.environ.get(var) for var in ENV.values()}
    for name, var in ENV.items():  # the overrides travel as the environment does, for this command only
        if getattr(args, name, None):
            os.environ[var] = getattr(args, name)
    try:
        return _run(args)
    finally:
        _leave_process_group()
        for var, value in saved.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value


def _leave_process_group() -> None:
    """A process of `accelerate launch` leaves its process group before it exits: left to the interpreter's
    teardown, gloo's threads can abort it ("terminate called without an active exception": rank 1 of the
    2-process training test, once in two fresh-clone CI runs)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _run(args) -> int:
    from hub.errors import USER_ERRORS

    try:
        return args.func(args)
    except USER_ERRORS as e:
        from tasks.registry import ConfigError

        lines = [f"{e.source}: {line}" for line in e.errors] if isinstance(e, ConfigError) else [str(e)]
        for line in lines:  # one line each, whatever the message quotes (a name with a newline...)
            print("borahub: error: " + line.replace("\r", "\\r").replace("\n", "\\n"), file=sys.stderr)
        return USER_ERROR
    except OSError as e:  # the file system refused (permissions, a full disk): say where, no traceback
        where = f"{e.filename}: " if e.filename else ""
        print(f"borahub: error: {where}{e.strerror or e}", file=sys.stderr)
        return USER_ERROR
    except KeyboardInterrupt:
        print("borahub: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
