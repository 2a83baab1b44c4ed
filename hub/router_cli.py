"""CLI commands for inference: `borahub route`, `borahub generate`, `borahub router fit`."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

# hub.router's GLOBAL_NAME and MODES, spelled out so that building the parser does not import torch.
GLOBAL_NAME = "_global"
MODES = ("select", "blend", "fallback")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of each message (it may be replaced after setup)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _warnings_to_stderr() -> None:
    """Engine warnings (truncation, replaced bytes) as one `borahub: warning:` line each."""
    log = logging.getLogger("borahub")
    if not log.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("borahub: warning: %(message)s"))
        log.addHandler(handler)
        log.propagate = False


def read_inputs(path: str) -> list[tuple[int, str, str | None]]:
    """(line number, text, task override or None) per non-blank line of a JSONL file ('-' = stdin).

    Each line is {"text": ...} with an optional "task", or a bare JSON string. Bytes that are not
    UTF-8 are replaced by U+FFFD with a warning; anything else malformed is a one-line user error."""
    from .router import RouterError

    try:
        raw = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as e:
        raise RouterError(f"--input {path}: cannot read ({e.strerror or e})") from None
    rows = []
    for n, line in enumerate(raw.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            logging.getLogger("borahub").warning("%s:%d: bytes that are not UTF-8 replaced by U+FFFD", path, n)
            text = line.decode("utf-8", errors="replace")
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise RouterError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
        if isinstance(obj, str):
            obj = {"text": obj}
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise RouterError(f'{path}:{n}: expected an object with a string "text" (or a JSON string)')
        task = obj.get("task")
        if task is not None and not isinstance(task, str):
            raise RouterError(f'{path}:{n}: "task" must be a string')
        rows.append((n, obj["text"], task))
    return rows


def _inputs(args) -> tuple[list[int], list[str], list[str | None]]:
    from .router import RouterError

    if args.input and args.texts:
        raise RouterError("give prompts as arguments or with --input, not both")
    if args.input:
        rows = read_inputs(args.input)
    else:
        rows = [(i, t, None) for i, t in enumerate(args.texts, 1)]
    if not rows:
        raise RouterError("no inputs (give prompts as arguments or --input FILE.jsonl)")
    lines, texts, tasks = zip(*rows)
    tasks = [args.task or t for t in tasks]
    return list(lines), list(texts), tasks


def _engine(args):
    from .engine import Engine

    return Engine.from_workspace(args.config, max_input_tokens=args.max_input_tokens)


def _routing(args) -> dict:
    return {"mode": args.mode, "top_k": args.top_k, "scorer": "bayes" if args.bayes else "classifier",
            "candidates": args.candidates}


def cmd_route(args) -> int:
    from tasks.atomic import atomic_write_text

    from .router import RouterError

    _warnings_to_stderr()
    lines, texts, tasks = _inputs(args)
    if args.out and (Path(args.out).is_dir() or not Path(args.out).resolve().parent.is_dir()):
        raise RouterError(f"--out {args.out}: not a file in an existing folder")
    routes = _engine(args).route(texts, task=tasks, **_routing(args))
    text = "".join(json.dumps({"input": n, **r.to_json()}) + "\n" for n, r in zip(lines, routes))
    if args.out:
        atomic_write_text(args.out, text)
    else:
        sys.stdout.write(text)
    return 0


def cmd_generate(args) -> int:
    _warnings_to_stderr()
    lines, texts, tasks = _inputs(args)
    gens = _engine(args).generate(texts, task=tasks, **_routing(args), max_new_tokens=args.max_new_tokens,
                                  do_sample=args.sample, temperature=args.temperature, top_p=args.top_p,
                                  seed=args.seed, chat=not args.no_chat)
    for n, g in zip(lines, gens):
        if args.json:
            print(json.dumps({"input": n, **g.to_json()}))
        else:
            used = ", ".join(f"{k} {v:.2f}" for k, v in g.route.weights.items())
            print(f"[{n}] {used}{' (fallback: ' + g.route.reason + ')' if g.route.fallback else ''}")
            print(g.text.strip())
            print()
    return 0


def cmd_router_fit(args) -> int:
    from .router import RouterConfig, fit_and_save
    from .workspace import Workspace

    ws = Workspace(args.config)
    mtm, _ = ws.trained_model()
    cfg = RouterConfig(bayes_docs=args.bayes_docs, target_accuracy=args.target_accuracy,
                       fallback_budget=args.fallback_budget, budget_confidence=args.budget_confidence)
    r = fit_and_save(ws, mtm, cfg, progress=not args.quiet)
    c, t = r.meta["calibration"], r.thresholds
    print(f"router: {len(r.tasks)} tasks, embeddings after layers {', '.join(map(str, r.layers))} "
          f"of {mtm.lm.config.num_hidden_layers}; "
          f"{c['split']} accuracy {c['accuracy']:.3f} on {c['inputs']} inputs (select mode)")
    kept = "n/a" if c["kept_accuracy"] is None else f"{c['kept_accuracy']:.3f}"
    print(f"fallback mode on {c['split']}: {c['false_fallback']:.1%} sent to {GLOBAL_NAME} (budget "
          f"{c['budget']:.0%} with {c['confidence']:.0%} confidence: {c['ood_rate']:.1%} unlike every task, "
          f"{c['unsure_rate']:.1%} unsure), "
          f"accuracy on the rest {kept}")
    print(f"thresholds: distance {t['ood']:.3f}, energy {t['energy']:.3f}"
          + (f", bayes {t['bayes']:.3f} (accuracy {c['bayes']['accuracy']:.3f} on {c['bayes']['inputs']})"
             if t["bayes"] is not None else ""))
    print(f"wrote {ws.store}/router.json and router.safetensors")
    return 0


def _checked(convert, ok, wanted: str):
    """An argparse type: convert the text, then check it; the error says what was wanted."""
    def parse(value: str):
        try:
            x = convert(value)
        except ValueError:
            x = None
        if x is None or not ok(x):
            raise argparse.ArgumentTypeError(f"must be {wanted} (got {value!r})")
        return x
    return parse


_positive = _checked(int, lambda n: n >= 1, "an integer >= 1")
_new_tokens = _checked(int, lambda n: 1 <= n <= 1_000_000, "an integer in [1, 1000000]")
_temperature = _checked(float, lambda x: 0 < x < 1e6, "a number > 0")
_seed = _checked(int, lambda n: 0 <= n < 2**31, "an integer in [0, 2^31)")
_fraction = _checked(float, lambda x: 0 < x <= 1, "a number in (0, 1]")
_budget = _checked(float, lambda x: 0 <= x < 1, "a number in [0, 1)")
_count = _checked(int, lambda n: n >= 0, "an integer >= 0")


def _routing_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("texts", nargs="*", metavar="PROMPT", help="prompts (or use --input)")
    p.add_argument("--input", help='JSONL file, one {"text": ..., "task": optional} per line ("-" = stdin)')
    p.add_argument("--task", help=f"use this task for every input (no routing); {GLOBAL_NAME} = the global adapter")
    p.add_argument("--mode", choices=MODES, default="fallback",
                   help="select: top task; blend: top-k tasks weighted by p; fallback (default): top task, or "
                        "the global adapter when the router is unsure or the input is unlike every task")
    p.add_argument("--top-k", type=_positive, default=2, help="tasks blended in --mode blend (default 2)")
    p.add_argument("--bayes", action="store_true",
                   help="route by p(task | x) ∝ p(x | adapter) p(task), scoring candidates in one mixed batch")
    p.add_argument("--candidates", type=_positive, help="with --bayes: score only the router's top tasks")
    p.add_argument("--max-input-tokens", type=_positive, default=1024,
                   help="longer prompts keep their last tokens, with a warning (default 1024)")


def add_commands(sub) -> None:
    ro = sub.add_parser("route", help="route inputs to task adapters (JSON lines out)")
    _routing_args(ro)
    ro.add_argument("--out", help="write the JSON lines here instead of stdout")
    ro.add_argument("--json", action="store_true", help="JSON lines (the only output format; accepted for symmetry)")
    ro.set_defaults(func=cmd_route)

    ge = sub.add_parser("generate", help="routed generation; rows of one batch may use different tasks")
    _routing_args(ge)
    ge.add_argument("--max-new-tokens", type=_new_tokens, default=64,
                    help="at most this many tokens per prompt (default 64; prompt + new tokens must fit the model)")
    ge.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    ge.add_argument("--temperature", type=_temperature, default=0.7, help="with --sample (default 0.7)")
    ge.add_argument("--top-p", type=_fraction, default=0.9, help="with --sample (default 0.9)")
    ge.add_argument("--seed", type=_seed, help="seed for --sample")
    ge.add_argument("--no-chat", action="store_true", help="do not apply the model's chat template")
    ge.add_argument("--json", action="store_true", help="one JSON object per prompt")
    ge.set_defaults(func=cmd_generate)

    rf = sub.add_parser("router", help="the router").add_subparsers(dest="router_command", required=True)
    fi = rf.add_parser("fit", help="fit the router on the tasks' data and calibrate it on their validation split")
    fi.add_argument("--bayes-docs", type=_count, default=0,
                    help="validation inputs per task to calibrate --bayes routing (each costs one forward per task)")
    fi.add_argument("--fallback-budget", type=_budget, default=0.05,
                    help="share of in-distribution validation inputs that --mode fallback may send to the global "
                         "adapter (default 0.05)")
    fi.add_argument("--budget-confidence", type=_budget, default=0.9,
                    help="probability that the fallback rate stays within the budget (default 0.9; 0 = on average)")
    fi.add_argument("--target-accuracy", type=_fraction, default=0.97,
                    help="with --bayes-docs: routing accuracy required above the Bayesian confidence threshold")
    fi.add_argument("--quiet", action="store_true", help="no progress bar")
    fi.set_defaults(func=cmd_router_fit)
