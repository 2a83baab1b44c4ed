"""The variants bench's report: docs/results/variants.{json,md} and the validation curves (variants_curves.png)."""
from __future__ import annotations

import json
from pathlib import Path

TITLES = {"bbc": "BBC News topics (documents, perplexity)",
          "hwu64": "HWU64 scenarios, request -> intent (short texts, label accuracy)"}


def pm(s: dict, scale: float = 1.0, fmt: str = ".2f", sign: bool = False) -> str:
    f = ("+" if sign else "") + fmt
    return f"{s['mean'] * scale:{f}} ± {s['sd'] * scale:{fmt}}"


def table(summary: dict) -> list[str]:
    accuracy = all("accuracy" in r for r in summary.values())
    head = ["variant", "mean test ppl", "vs LoRA", "share of LoRA's gain", *(["label accuracy"] if accuracy else []),
            "trainable / task", "step time vs LoRA", "peak memory (MB)"]
    base = summary["lora"]["base_perplexity"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
             f"| base model | {base:.2f} | | 0% | " + ("| " if accuracy else "") + "0 | | |"]
    for name, r in summary.items():
        cells = [name, pm(r["mean_perplexity"]), pm(r["vs_lora"], 100, ".1f", sign=True) + "%",
                 pm(r["share_of_lora_gain"], 100, ".0f") + "%",
                 *([pm(r["accuracy"], 100, ".1f") + "%"] if accuracy else []),
                 f"{r['trainable_per_task']:,} ({100 * r['trainable_vs_lora']:.2f}%)",
                 pm(r["step_time_vs_lora"]), f"{r['peak_memory_mb']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def plot(out: dict, folder: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = list(out["runs"])
    fig, axes = plt.subplots(1, len(data), figsize=(6 * len(data), 4.2), squeeze=False)
    for ax, d in zip(axes[0], data):
        for i, (name, by_seed) in enumerate(out["runs"][d].items()):
            for j, run in enumerate(by_seed.values()):
                steps, ppl = zip(*run["curve"])
                ax.plot(steps, ppl, color=f"C{i}", lw=2.2 if name == "lora" else 1.2, alpha=0.85,
                        label=name if j == 0 else None)
        ax.set_yscale("log")
        ax.set_xlabel("optimiser step")
        ax.set_ylabel("mean validation perplexity")
        ax.set_title(TITLES.get(d, d), fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle("Validation perplexity during training, every seed (one line each)", fontsize=10)
    fig.tight_layout()
    path = folder / "variants_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name  # beside the JSON


def markdown(out: dict) -> str:
    lines = ["# Adapter variants at their defaults", "",
             f"Command: `{out['command']}`  ", f"Machine: {out['machine']}  ", f"Date: {out['date']}", "",
             "SmolLM2-135M-Instruct; every variant exactly as the registry gives it (adapter type at its defaults, "
             f"`hiddenkey: {{}}`, `gmt: {{}}`), rank 8 on all seven projections, tau {out['tau']:g}, seeds "
             f"{', '.join(map(str, out['seeds']))} (mean ± sd over seeds). 'vs LoRA' is each seed's mean test "
             "perplexity against LoRA's of the same seed; 'share of LoRA's gain' is log(base / variant) / "
             "log(base / LoRA), the share of LoRA's gain in mean token NLL (HWU64's base model gives the unseen "
             "labels perplexities of 10^3-10^5, so a share in perplexity would say nothing). Step time: median "
             f"optimiser step against LoRA's ({out['jobs']} run(s) at a time, threads per run: "
             f"{out['threads'] or 'torch default'}). "
             "Peak memory: the run's "
             "process (resident set on CPU, allocated on GPU). The curves (variants_curves.png) show validation "
             "perplexity every few steps: LoRA's has flattened by the end of the budget.", ""]
    for d, summary in out["summary"].items():
        m = out["mode"][d]
        lines += [f"## {TITLES.get(d, d)}", "",
                  f"{m['steps']} optimiser steps of {m['batch_size']} x {m['grad_accum']} rows (max {m['max_length']}"
                  f" tokens), lr {m['lr']} (cosine), up to {m['max_train']} training examples per task, test "
                  "perplexity on " + (f"up to {m['eval_docs']} examples per task" if m["eval_docs"] < 10 ** 6 else
                                       "every test example")
                  + ("; label accuracy on every test request." if "accuracy" in summary["lora"] else "."),
                  "", *table(summary), ""]
        lines += ["Goals: " + "; ".join(f"{k}: {'met' if v else 'not met'}" for k, v in out["goals"][d].items()), ""]
    return "\n".join(lines)


def write_report(out: dict, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    out["figure"] = plot(out, folder)
    (folder / "variants.json").write_text(json.dumps(out, indent=2) + "\n")
    (folder / "variants.md").write_text(markdown(out))
