"""Accuracy of delayed-gradient algorithms under staleness (simulated N workers), beside the DC-ASGD paper."""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from threadpoolctl import threadpool_limits

from benchmarks.common import REPORTS, markdown_table, write_report
from hpdl.algorithms import registry
from hpdl.simulate import SimConfig, simulate

# Small enough that 2 x 19 simulations of a few epochs fit the 20-minute budget on 2 cores.
MODELS = {"mlp": {"hidden": [256, 256]}, "cnn": {"channels": [8, 16], "hidden": 64}}
ALGORITHMS = ["sync", "asgd", "dcasgd-c", "dcasgd-a", "easgd", "bmuf"]
# τ for the periodic algorithms: §5's τ = 100 and fairseq's 50 exceed a short run at N = 16
# (29 steps per worker per epoch at batch 128), so they would barely communicate.
HYPER = {"easgd": {"tau": 4}, "bmuf": {"tau": 4}}
# ALGORITHMS.md §4, paper Table 1: ResNet-20 on CIFAR-10, M = 4 workers, test error.
PAPER = {"sequential": 8.65, "asgd": 9.27, "dcasgd-a": 8.19}


def configurations(models: list[str], workers: list[int], epochs: dict[str, int], args) -> list[SimConfig]:
    """Sequential SGD once per model, then every algorithm at every N with delay N-1."""
    common = {"batch_size": args.batch_size, "lr": args.lr, "seed": args.seed, "data": args.data}
    out = []
    for model in models:
        base = {"model": model, "model_options": MODELS[model], "epochs": epochs[model], **common}
        out.append(SimConfig("asgd", workers=1, delay="constant:0", **base))
        for n in workers:
            for algorithm in ALGORITHMS:
                delay = f"constant:{n - 1}" if algorithm not in ("sync", "bmuf") else ""
                out.append(SimConfig(algorithm, workers=n, delay=delay, hyper=HYPER.get(algorithm, {}), **base))
    return out


def row_of(cfg: SimConfig, result: dict, source: str = "simulated") -> dict:
    name = "sequential" if cfg.workers == 1 else cfg.algorithm
    return {"source": source, "model": cfg.model, "algorithm": name, "workers": cfg.workers,
            "epochs": cfg.epochs, "test_acc": result["test_acc"], "test_loss": result["test_loss"],
            "mean_delay": result["mean_delay"], "max_delay": result["max_delay"], "wall_s": result["wall_s"]}


def run_all(configs: list[SimConfig]) -> list[dict]:
    rows = []
    for cfg in configs:
        result = simulate(cfg).result
        rows.append(row_of(cfg, result))
        print(f"{cfg.model} {rows[-1]['algorithm']:10s} N={cfg.workers:2d}: test acc {result['test_acc']:.4f}, "
              f"loss {result['test_loss']:.4f}, mean delay {result['mean_delay']:.2f} "
              f"({result['wall_s']:.1f} s)", flush=True)
    return rows


def read_extra_rows(path: str | Path) -> list[dict]:
    """Rows of real MPI runs, one JSON object per line, with at least the keys model, algorithm,
    workers, test_acc, test_loss (e.g. a RESULT line's JSON plus model/algorithm/workers);
    `source` defaults to "mpi". This is the hook for the parameter-server runs at N = 4."""
    rows = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows.append({"source": "mpi", "epochs": None, "mean_delay": None, "max_delay": None,
                         "wall_s": None, **row})
    return rows


def mpi_rows(models: list[str], n: int, epochs: dict[str, int], args) -> list[dict]:
    """Real runs of every algorithm at N = n workers (`mpirun python -m hpdl.train`, one parameter server
    for the parameter-server algorithms), in the simulations' setup: rows for `report`'s extra rows."""
    from benchmarks.pipeline import train  # launches mpirun, one BLAS thread per rank
    rows = []
    for model in models:
        with tempfile.TemporaryDirectory() as tmp:
            config = Path(tmp) / "model.yaml"
            config.write_text(f"model: {model}\nmodel_options: {json.dumps(MODELS[model])}\n")
            common = ["--config", str(config), "--data", args.data, "--epochs", str(epochs[model]),
                      "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--lr-schedule", "constant",
                      "--momentum", "0", "--weight-decay", "0", "--seed", str(args.seed), "--stages", "1"]
            for algorithm in ALGORITHMS:
                ps = int(registry.get(algorithm).kind == "ps")
                hyper = [f"--{k.replace('_', '-')}={v}" for k, v in HYPER.get(algorithm, {}).items()]
                res = train(n + ps, *common, "--algorithm", algorithm, "--ps", str(ps), *hyper)
                rows.append({"source": "mpi", "model": model, "algorithm": algorithm, "workers": n,
                             "epochs": res["epochs"], "test_acc": res["test_acc"], "test_loss": res["test_loss"],
                             "mean_delay": res.get("mean_delay", 0.0), "max_delay": res.get("max_delay", 0),
                             "wall_s": res["wall_s"]})
                print(f"{model} {algorithm:10s} N={n:2d} (mpi): test acc {res['test_acc']:.4f}, mean delay "
                      f"{rows[-1]['mean_delay']:.2f} ({res['wall_s']:.1f} s)", flush=True)
    return rows


def report(rows: list[dict], extra_rows: list[dict] = (), note: str = "") -> Path:
    """Write staleness.md/.json/.png from simulated `rows` and any `extra_rows` (real MPI runs)."""
    rows = list(rows) + list(extra_rows)
    body = [note, "", "## Final test accuracy / loss", ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        body += [f"### {model}", "", markdown_table(
            ["source", "algorithm", "N", "epochs", "test acc", "test loss", "mean delay", "max delay", "wall s"],
            [[r["source"], r["algorithm"], r["workers"], _num(r["epochs"]), f"{r['test_acc']:.4f}",
              f"{r['test_loss']:.4f}", _num(r["mean_delay"]), _num(r["max_delay"]), _num(r["wall_s"])]
             for r in mine]), "", *ordering_lines(mine), ""]
    body += ["## Beside the DC-ASGD paper", "",
             "Zheng et al. (ICML 2017), Table 1 (ResNet-20, CIFAR-10, M = 4 workers, test error): "
             f"sequential SGD {PAPER['sequential']}%, ASGD {PAPER['asgd']}%, DC-ASGD-a {PAPER['dcasgd-a']}%: "
             "ASGD < DC-ASGD ≈ sequential in accuracy. The lines above state, per model and N, whether "
             "the simulated runs show the same ordering.", "", "![accuracy](staleness.png)"]
    plot(rows)
    return write_report("staleness", "Staleness: delayed-gradient algorithms in the simulator",
                        "\n".join(body), {"note": note, "rows": rows})


def ordering_lines(rows: list[dict]) -> list[str]:
    """Per N: does ASGD < DC-ASGD hold, and how far is DC-ASGD-a from sequential SGD?"""
    acc = {(r["algorithm"], r["workers"], r["source"]): r["test_acc"] for r in rows}
    seq = next((r["test_acc"] for r in rows if r["algorithm"] == "sequential"), None)
    lines = []
    for n, source in sorted({(r["workers"], r["source"]) for r in rows if r["workers"] > 1}):
        a, c, d = (acc.get((x, n, source)) for x in ("asgd", "dcasgd-c", "dcasgd-a"))
        if None in (a, c, d, seq):
            continue
        lines.append(f"- N = {n} ({source}): ASGD {a:.4f}, DC-ASGD-c {c:.4f}, DC-ASGD-a {d:.4f}, sequential "
                     f"{seq:.4f}. ASGD < DC-ASGD-c: {_yes(a < c)}; ASGD < DC-ASGD-a: {_yes(a < d)}; "
                     f"DC-ASGD-a minus sequential: {(d - seq) * 100:+.2f} points.")
    return lines


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _num(x) -> str:
    return "" if x is None else f"{x:.3g}" if isinstance(x, float) else str(x)


def plot(rows: list[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.6), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == model]
        for algorithm in dict.fromkeys(r["algorithm"] for r in mine):
            if algorithm == "sequential":
                ax.axhline(next(r["test_acc"] for r in mine if r["algorithm"] == algorithm),
                           color="black", linestyle="--", label="sequential")
                continue
            for source, marker in (("simulated", "o-"), ("mpi", "s")):
                pts = sorted((r["workers"], r["test_acc"]) for r in mine
                             if r["algorithm"] == algorithm and r["source"] == source)
                if pts:
                    ax.plot(*zip(*pts), marker, label=algorithm + ("" if source == "simulated" else " (mpi)"))
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["workers"] for r in mine if r["workers"] > 1}))
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("workers N (delay N-1)")
        ax.set_ylabel("test accuracy")
        ax.set_title(model)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(REPORTS / "staleness.png", dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="1 epoch, mlp only (a minute)")
    ap.add_argument("--workers", default="4,8,16")
    ap.add_argument("--mlp-epochs", type=int, default=3)
    ap.add_argument("--cnn-epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.03)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="BLAS threads (1: steady on a shared machine; 2 threads thrash under load)")
    ap.add_argument("--data", default="data/mnist.h5")
    ap.add_argument("--extra", default="", help="JSON lines of real MPI runs to add (see read_extra_rows)")
    ap.add_argument("--mpi-workers", type=int, default=4, help="also run every algorithm for real over MPI "
                    "with this many workers (0: none)")
    ap.add_argument("--render-only", action="store_true",
                    help="no simulations: redraw the report from reports/staleness.json's simulated rows "
                    "(with --extra, to add MPI runs)")
    args = ap.parse_args()
    extra = read_extra_rows(args.extra) if args.extra else []
    if args.render_only:
        saved = json.loads((REPORTS / "staleness.json").read_text())
        print(report([r for r in saved["rows"] if r["source"] == "simulated"], extra, saved["note"]))
        return
    models = ["mlp"] if args.quick else list(MODELS)
    epochs = {"mlp": 1, "cnn": 1} if args.quick else {"mlp": args.mlp_epochs, "cnn": args.cnn_epochs}
    if args.mpi_workers:
        extra += mpi_rows(models, args.mpi_workers, epochs, args)
    with threadpool_limits(args.threads):
        rows = run_all(configurations(models, [int(n) for n in args.workers.split(",")], epochs, args))
    note = (f"Simulated with `hpdl.simulate` (one process, BLAS threads: {args.threads}): N workers, each "
            f"with its own replica's batches (batch {args.batch_size} per worker step), lr {args.lr} "
            f"constant, plain SGD (no momentum), seed {args.seed}, float32. Parameter-server algorithms "
            "run round-robin with every gradient N-1 server versions stale (constant:N-1). Epochs: "
            + ", ".join(f"{m} {epochs[m]}" for m in models) + " (chosen so the default run fits 20 minutes "
            "on a 2-core machine). Models: " + ", ".join(f"{m} {MODELS[m]}" for m in models)
            + ". Hyper-parameters are ALGORITHMS.md's defaults (DC-ASGD-c λ 0.04; DC-ASGD-a λ0 2, "
            "μ 0.95, ε 1e-7; EASGD α 0.9/N; BMUF η_b 0.875, ζ 1, Nesterov) except τ = 4 for EASGD and "
            "BMUF, because §5's τ = 100 and fairseq's 50 exceed these short runs. Sync averages N gradients per "
            "update, so it makes N times fewer (N times larger) updates per epoch than sequential SGD.")
    print(report(rows, extra, note))


if __name__ == "__main__":
    main()
