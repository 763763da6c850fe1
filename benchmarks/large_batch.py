"""Large-batch learning rates on MNIST: updates and time to a batch-128 SGD target, per method and batch size.

Every run is one process with gradient accumulation (global batch = 128 x S, S micro-batches
per update), the same arithmetic as S replicas of `--algorithm sync` (tests/unit/test_largebatch.py
checks the two agree). Each run's metrics file is kept under reports/large_batch/, and a run
whose file ends in a RESULT is not run again, so an interrupted benchmark resumes.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

from benchmarks.common import REPORTS, markdown_table, write_report

RUNS = REPORTS / "large_batch"
# NAME@W: the method with gain ratios smoothed by weight W on new values instead of S/1000.
METHODS = ("lsw", "lars", "lamb", "adascale", "lena", "lena@0.1")
MICRO = 128  # samples per micro-batch: the single-worker batch
PLANS = ("cnn:2:1,8,32,128", "cnn:8:1,8,32", "cnn/full:4:1,8,32", "resnet:1:1,16,128")
# Narrower than the models' defaults, so that the whole grid runs in an hour on two cores.
OPTIONS = {"cnn": "{channels: [8, 16], hidden: 64}", "resnet": "{channels: [4, 8, 16]}"}


READING = """\
How to read the tables. The runs are short (a few epochs on two cores), which decides what
the gain methods can do. AdaScale and LENA smooth the two sides of their gain ratios, top
and bot, with weight S/1000 on each new value (ALGORITHMS.md section 9): a time constant
of 1000/S updates (125 at S = 8, 31 at S = 32) against 116 to 464 updates per run here.
And top and bot are squared gradient norms, which shrink by orders of magnitude as the
loss falls, so their averages stay dominated by the large early values, taken where the
micro-batch gradients agree and the ratio is close to 1 (the layer plots show the ratios
creeping up from there). Both methods then step at a few times the base lr where linear
scaling steps at S times it. `lena@0.1` is LENA with weight 0.1 (`--gain-smoothing 0.1`):
its ratios follow the noise as training proceeds (up to the cap S), and the per-layer
plots show the paper's premise, layers that differ: the linear layers' ratios (and so
their rates) run above the convolutions'. LENA's warm-up counts layer progress (the sum of
its scales), so a layer whose ratio stays low also warms up slowly. At S = 128 every method
gets 3 to 6 updates in these budgets, which no method turns into a trained model.
"""


def run(model: str, options: str, S: int, method: str, epochs: int, evals_per_epoch: int, warmup: float,
        eta: float, data: str, threads: int) -> dict:
    """One training run (or its kept result): RESULT, eval records and per-layer lr records."""
    path = RUNS / f"{run_tag(model, options)}_{method}_S{S}_e{epochs}.jsonl"
    result_path = path.with_suffix(".result.json")
    if not (path.exists() and result_path.exists()):
        steps_per_epoch = 60000 // (MICRO * S)
        total = epochs * steps_per_epoch
        # Warm-up over the same share of the samples for every method; LENA counts it in
        # layer progress, i.e. micro-batch updates, so its W is S times the update count.
        warm = math.ceil(warmup * total) if warmup else 0
        name, _, smoothing = method.partition("@")
        flags = [] if name in ("none", "adascale") else \
            ["--warmup-steps", str(warm * S if name == "lena" else warm)]
        if smoothing:
            flags += ["--gain-smoothing", smoothing]
        if method == "lars":
            flags += ["--trust-coefficient", str(eta)]
        path.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "hpdl.train", "--model", model, "--data", data, "--batch-size", str(MICRO),
               "--accumulate", str(S), "--lr-method", name, "--epochs", str(epochs), "--threads", str(threads),
               "--eval-every", str(max(1, steps_per_epoch // evals_per_epoch)), "--metrics", str(path),
               "--no-progress", *flags]
        if options:
            cmd += ["--config", str(options_file(model, options))]
        print(" ".join(cmd[1:]), flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"run failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
        result_path.write_text(proc.stdout.strip().splitlines()[-1].removeprefix("RESULT "))
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return {"result": json.loads(result_path.read_text()), "evals": [r for r in lines if r["kind"] == "eval"],
            "lr": [r for r in lines if r["kind"] == "lr"], "S": S, "method": method}


def lars_eta(model: str, options: str, data: str) -> float:
    """LARS trust coefficient putting the median weight tensor's trust at 0.1 on the first batch.

    The norm ratios ||w|| / ||g|| differ by 30x between the cnn (about 1) and the resnet
    (about 30), so one eta does not fit both; 0.1 is what a sweep of eta in {0.01, 0.1, 1}
    on the cnn at S = 32 found best (1 diverged).
    """
    import numpy as np
    import yaml

    from hpdl.data import Loader
    from hpdl.models import build_model
    from hpdl.trainer import loss_and_grads
    m = build_model(model, **(yaml.safe_load(options) if options else {}))
    params = m.init(0)
    x, y = next(Loader(data, "train", MICRO).epoch(0))
    _, grads = loss_and_grads(m.layers, params, x, y, (0, 0, 0))
    ratios = [np.linalg.norm(p[n]) / np.linalg.norm(g[n]) for layer, p, g in zip(m.layers, params, grads)
              for n in layer.trainable if n not in layer.no_decay]
    return float(0.1 / np.median(ratios))


def run_tag(model: str, options: str) -> str:
    """The model's name in file names, marked when its builder options are not the benchmark's default."""
    if options == OPTIONS.get(model, ""):
        return model
    return f"{model}-{hashlib.sha256(options.encode()).hexdigest()[:8]}"


def options_file(model: str, options: str) -> Path:
    """A YAML config holding the model's builder options."""
    path = RUNS / f"{run_tag(model, options)}_options.yaml"
    path.write_text(f"model_options: {options}\n")
    return path


def to_target(r: dict, target: float) -> tuple[int | None, float | None]:
    """Updates and training seconds at the first evaluation at or above the target."""
    for e in r["evals"]:
        if e["test_acc"] >= target:
            return e["step"], e["train_s"]
    return None, None


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save(fig, name: str) -> str:
    """The figure as reports/NAME, closed; NAME for the report's link."""
    fig.tight_layout()
    fig.savefig(REPORTS / name, dpi=110)
    pyplot().close(fig)
    return name


def plot_accuracy(model: str, tag: str, epochs: int, runs: list[dict], target: float) -> str:
    plt = pyplot()
    sizes = sorted({r["S"] for r in runs if r["S"] > 1})
    fig, axes = plt.subplots(1, len(sizes), figsize=(4 * len(sizes), 3.2), squeeze=False)
    base = next(r for r in runs if r["S"] == 1)
    for ax, S in zip(axes[0], sizes):
        ax.plot([e["epoch"] for e in base["evals"]], [100 * e["test_acc"] for e in base["evals"]],
                color="black", lw=1, label="SGD, batch 128")
        for r in runs:
            if r["S"] == S:
                ax.plot([e["epoch"] for e in r["evals"]], [100 * e["test_acc"] for e in r["evals"]],
                        marker=".", label=r["method"])
        ax.axhline(100 * target, color="gray", ls="--", lw=0.7)
        ax.set_ylim(max(0, 100 * target - 15), 100)
        ax.set_title(f"{model}, batch {MICRO * S}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("test accuracy (%)")
    axes[0][0].legend(fontsize=7)
    return save(fig, f"large_batch_{tag}_e{epochs}_accuracy.png")


def plot_layers(model: str, tag: str, epochs: int, runs: list[dict]) -> str:
    """LENA's per-layer learning rate and gain ratio over training, one line per layer, per batch size."""
    plt = pyplot()
    lena = [r for r in runs if r["method"].startswith("lena") and r["S"] > 1 and r["lr"]]
    fig, axes = plt.subplots(2, len(lena), figsize=(4 * len(lena), 5.5), squeeze=False)
    for k, r in enumerate(lena):
        steps = [rec["step"] for rec in r["lr"]]
        for j, layer in enumerate(r["lr"][0]["layers"]):
            axes[0][k].plot(steps, [rec["lr"][j] for rec in r["lr"]], lw=1, label=layer)
            axes[1][k].plot(steps, [rec["gain"][j] for rec in r["lr"]], lw=1, label=layer)
        axes[0][k].set_title(f"{r['method']} {model}, batch {MICRO * r['S']} (S={r['S']})", fontsize=9)
        axes[0][k].set_ylabel("learning rate")
        axes[1][k].set_ylabel("gain ratio (cap S)")
        axes[1][k].set_xlabel("update")
    axes[0][0].legend(fontsize=6)
    return save(fig, f"large_batch_{tag}_e{epochs}_layers.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plan", action="append", metavar="MODEL:EPOCHS:S,S,...",
                    help="a model (MODEL/full: at the builder's default widths), the epochs of each of its runs "
                         "(the same samples for all) and the S values "
                         "(global batch = 128 x S; S = 1 is the SGD baseline); repeatable "
                         f"(default: {' '.join(PLANS)})")
    ap.add_argument("--options", action="append", default=[], metavar="MODEL=YAML",
                    help="a model's builder options, e.g. cnn='{channels: [32, 64]}' ('' for the model's default; "
                         f"default: {', '.join(f'{m}={o}' for m, o in OPTIONS.items())})")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--evals-per-epoch", type=int, default=4)
    ap.add_argument("--warmup", type=float, default=0.1, help="warm-up share of the run (0: none)")
    ap.add_argument("--eta", type=float, default=0.0,
                    help="LARS trust coefficient (0: per model, the median trust ratio at 0.1 on the first batch)")
    ap.add_argument("--tolerance", type=float, default=0.005,
                    help="target = the batch-128 SGD run's final accuracy minus this")
    ap.add_argument("--threads", type=int, default=1, help="BLAS threads per run (kept runs are not redone)")
    ap.add_argument("--data", default="data/mnist.h5")
    args = ap.parse_args()
    RUNS.mkdir(parents=True, exist_ok=True)
    methods = args.methods.split(",")
    body, data = [], {}
    for spec in args.plan or list(PLANS):
        try:
            model, epochs, sizes = spec.split(":")
            epochs, sizes = int(epochs), [int(s) for s in sizes.split(",")]
        except ValueError:
            ap.error(f"--plan {spec!r}: expected MODEL:EPOCHS:S,S,... such as cnn:2:1,8,32")
        model, _, width = model.partition("/")
        # MODEL/full: the builder's own widths, beside the narrower benchmark default
        options = "" if width == "full" else {**OPTIONS, **dict(o.split("=", 1) for o in args.options)}.get(model, "")
        common = (model, options)
        eta = args.eta or lars_eta(model, options, args.data)
        rest = (epochs, args.evals_per_epoch, args.warmup, eta, args.data, args.threads)
        base = run(*common, 1, "none", *rest)
        target = base["result"]["test_acc"] - args.tolerance
        runs = [base] + [run(*common, S, m, *rest) for S in sizes if S > 1 for m in methods]
        rows = []
        for r in runs:
            steps, secs = to_target(r, target)
            rows.append([MICRO * r["S"], r["S"], "SGD" if r["method"] == "none" else r["method"],
                         steps if steps is not None else "not reached", f"{secs:.0f}" if secs else "-",
                         f"{100 * max(e['test_acc'] for e in r['evals']):.2f}%",
                         f"{100 * r['result']['test_acc']:.2f}%", r["result"]["steps"]])
        best = best_baselines(runs, target)
        tag = run_tag(model, options)
        figs = [plot_accuracy(model, tag, epochs, runs, target), plot_layers(model, tag, epochs, runs)]
        body.append(f"## {model}{' ' + options if options else ' (default widths)'}, {epochs} epoch{'s' if epochs > 1 else ''} per run\n\n"
                    f"Target: {100 * target:.2f}% = the batch-128 SGD run's final {100 * base['result']['test_acc']:.2f}%"
                    f" minus {100 * args.tolerance:.1f} points. LARS trust coefficient {eta:.3g}.\n\n"
                    + markdown_table(["global batch", "S", "method", "updates to target", "train s to target",
                                      "best accuracy", "final accuracy", "updates"], rows)
                    + "\n\n" + best + "\n\n" + "\n".join(f"![{f}]({f})" for f in figs) + "\n")
        data[f"{tag}_e{epochs}"] = {"target": target, "lars_eta": eta, "runs": [{k: v for k, v in r.items() if k != "lr"} for r in runs]}
    text = (f"One process per run, {args.threads} BLAS threads, float32; the same number of epochs (samples) for "
            f"every run of a model, micro-batch {MICRO}, global batch 128 x S by gradient accumulation. SGD momentum "
            "0.9, weight decay 5e-4, cosine decay, the model's base lr (cnn 0.02, resnet 0.05); lsw and lars scale "
            f"it by S, lamb uses lr 1e-3 x sqrt(S); warm-up over the first {100 * args.warmup:.0f}% of the "
            f"updates (LENA: the same share in layer progress), none for AdaScale; LARS trust coefficient "
            f"per model as stated below. Accuracy is evaluated {args.evals_per_epoch} times per epoch, so updates to target are "
            "counted at those points; train seconds exclude evaluation. Other jobs shared the two cores while "
            "these runs ran, so train seconds compare only runs made at the same time; updates do not depend on "
            "load.\n\n" + READING + "\n" + "\n".join(body))
    print(write_report("large_batch", "Large-batch learning-rate methods on MNIST", text, data))


def change(value: float, baseline: float, down: str, up: str) -> str:
    """'45.2% fewer' or '20.0% more': value against baseline."""
    ratio = value / baseline - 1
    return f"{100 * abs(ratio):.1f}% {down if ratio < 0 else up}"


def best_baselines(runs: list[dict], target: float) -> str:
    """Each LENA variant against the best of the other methods, per batch size, in updates and time to target."""
    lines = []
    for S in sorted({r["S"] for r in runs if r["S"] > 1}):
        reached = {r["method"]: to_target(r, target) for r in runs if r["S"] == S}
        others = {m: v for m, v in reached.items() if not m.startswith("lena") and v[0] is not None}
        for variant in (m for m in reached if m.startswith("lena")):
            steps, secs = reached[variant]
            if steps is None:
                verdict = f"{variant} did not reach the target" + \
                    (f"; {', '.join(others)} did" if others else "; nor did any other method")
            elif not others:
                verdict = f"only {variant} reached the target ({steps} updates)"
            else:
                m_steps = min(others, key=lambda m: others[m][0])
                m_time = min(others, key=lambda m: others[m][1])
                verdict = (f"{variant} {steps} updates vs the best other ({m_steps}) {others[m_steps][0]}: "
                           f"{change(steps, others[m_steps][0], 'fewer', 'more')}; {secs:.0f} s vs ({m_time}) "
                           f"{others[m_time][1]:.0f} s: {change(secs, others[m_time][1], 'less', 'more')} time")
            lines.append(f"- batch {MICRO * S}: {verdict}")
    return "\n".join(lines)

if __name__ == "__main__":
    main()
