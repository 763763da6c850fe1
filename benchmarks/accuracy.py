"""Test accuracy of the default single-process runs (mlp, cnn) on MNIST after 10 epochs."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

from benchmarks.common import REPORTS, markdown_table, write_report


def train(model: str, data: str, extra: list[str]) -> tuple[dict, list[dict]]:
    """Run `python -m hpdl.train` with default settings; its RESULT and its metrics lines."""
    metrics = REPORTS / f"accuracy_{model}.jsonl"
    metrics.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "hpdl.train", "--model", model, "--data", data, "--no-progress",
           "--metrics", str(metrics), *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1].removeprefix("RESULT "))
    return result, [json.loads(l) for l in metrics.read_text().splitlines()]


def plot(curves: dict[str, list[dict]]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for model, lines in curves.items():
        evals = [l for l in lines if l["kind"] == "eval"]
        ax.plot([l["epoch"] for l in evals], [100 * l["test_acc"] for l in evals], marker="o", label=model)
    ax.axhline(98, color="gray", lw=0.6, ls="--")
    ax.axhline(99, color="gray", lw=0.6, ls=":")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(REPORTS / "accuracy.png", dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", default="mlp,cnn")
    ap.add_argument("--data", default="data/mnist.h5")
    ap.add_argument("extra", nargs="*", help="further hpdl.train flags (after --)")
    args = ap.parse_args()
    targets = {"mlp": 0.98, "cnn": 0.99}
    rows, results, curves = [], {}, {}
    for model in args.models.split(","):
        res, curves[model] = train(model, args.data, args.extra)
        results[model] = res
        target = targets.get(model)
        rows.append([model, f"{100 * res['test_acc']:.2f}%", f"{res['test_loss']:.4f}", f"{res['epochs']:.0f}",
                     f"{res['samples_per_s']:.0f}", f"{res['wall_s']:.0f}",
                     f"{100 * target:.0f}%: {'met' if target and res['test_acc'] >= target else 'NOT met'}"])
        print(model, res, flush=True)
    plot(curves)
    body = ("Single process, float32, default settings (`python -m hpdl.train --model M`: SGD momentum 0.9, "
            "the model's default lr: mlp 0.05, cnn 0.02; cosine decay, weight decay 5e-4, batch 128, 10 epochs, "
            "seed 0; the cnn has dropout 0.5 before its last layer), 2 BLAS threads.\n\n"
            + markdown_table(["model", "test accuracy", "test loss", "epochs", "samples/s", "wall s", "target"], rows)
            + "\n\n![test accuracy per epoch](accuracy.png)\n\nPer-epoch metrics: `accuracy_<model>.jsonl`.\n")
    print(write_report("accuracy", "MNIST accuracy of the default runs", body, {"results": results}))


if __name__ == "__main__":
    main()
