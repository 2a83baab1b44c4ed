"""`borahub push` and `borahub pull`: the Hub endpoint and token come from huggingface_hub's usual
settings (HF_ENDPOINT, HF_TOKEN or `hf auth login`)."""
from __future__ import annotations


def cmd_push(args) -> int:
    from hub.cli import _tasks_arg
    from hub.remote import push

    r = push(args.config, args.repo_id, revision=args.revision, private=args.private, tasks=_tasks_arg(args.tasks),
             tag=args.tag, evaluate=not args.no_eval, message=args.message)
    if r.uploaded or r.deleted:
        print(f"pushed {len(r.tasks)} task(s) to {r.repo_id}@{r.revision}: commit {r.commit[:12]} "
              f"({len(r.uploaded)} file(s) uploaded, {len(r.deleted)} deleted)")
    else:
        print(f"{r.repo_id}@{r.revision} is up to date (commit {r.commit[:12]}); nothing uploaded")
    if r.tag:
        print(f"tagged {r.commit[:12]} as {r.tag}")
    return 0


def cmd_pull(args) -> int:
    from hub.cli import _tasks_arg
    from hub.remote import pull

    r = pull(args.config, args.repo_id, revision=args.revision, tasks=_tasks_arg(args.tasks), force=args.force)
    print(f"pulled {len(r.tasks)} task(s) from {r.repo_id}@{r.revision} (commit {r.commit[:12]}): {', '.join(r.tasks)}")
    if r.replaced:
        print(f"replaced local task(s): {', '.join(r.replaced)}")
    if r.no_data:
        print(f"registered without data (their data files are not here; inference only): {', '.join(r.no_data)}")
    if r.router == "local":
        print("kept the local router; `borahub router fit` makes pulled tasks with data routable")
    elif r.router is None:
        print("no router came with this pull: `borahub router fit` fits one for the tasks with data")
    return 0


def add_commands(sub) -> None:
    pu = sub.add_parser("push", help="push the hub to a Hugging Face Hub model repo")
    pu.add_argument("repo_id")
    pu.add_argument("--revision", help="branch to push to (created from main if new; default: main)")
    pu.add_argument("--private", action="store_true", help="create the repo private (if it does not exist)")
    pu.add_argument("--tasks", help="comma-separated subset of the stored tasks (default: all)")
    pu.add_argument("--tag", help="tag the pushed commit")
    pu.add_argument("--message", help="commit message")
    pu.add_argument("--no-eval", action="store_true", help="skip the held-out perplexity for the model card")
    pu.set_defaults(func=cmd_push)

    pl = sub.add_parser("pull", help="pull a pushed hub into the registry and store")
    pl.add_argument("repo_id")
    pl.add_argument("--revision", help="branch, tag or commit (default: main)")
    pl.add_argument("--tasks", help="comma-separated subset of the repo's tasks (default: all)")
    pl.add_argument("--force", action="store_true", help="replace local tasks with the same names")
    pl.set_defaults(func=cmd_pull)
