"""The PNG plots of a results table: test error against each measure, and the PAC-Bayes bound against the
measured error."""
from flatfast.experiments.measurement import MEASURES


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend: the experiment writes its figures, it never shows them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(rows, out, likelihood):
    import matplotlib.ticker

    plt = pyplot()

    colours = {"sgd": "tab:blue", "adam": "tab:orange", "entropy-sgd": "tab:green"}
    shown = [r for r in rows if r["reached_100_on_S"]]
    left_out = sum(not r["reached_100_on_S"] and not r["rescaled"] for r in rows)
    note = f" ({left_out} network(s) that never reached 100 % on S not shown)" if left_out else ""
    fig_all, axes = plt.subplots(2, 3, figsize=(15, 9))
    for ax_all, (name, label) in zip(axes.flat, MEASURES):
        fig, ax = plt.subplots(figsize=(5.5, 4.5))
        for target in (ax, ax_all):
            for opt in sorted({r["optimizer"] for r in shown}):
                for rescaled in (False, True):
                    pts = [r for r in shown if r["optimizer"] == opt and r["rescaled"] == rescaled]
                    if not pts:
                        continue
                    key = f"log_p_{likelihood}" if name == "log_p" else name
                    target.scatter([r[key] for r in pts], [r["test_error"] for r in pts],
                                   c=colours.get(opt, "tab:gray"), marker="x" if rescaled else "o",
                                   s=45 if rescaled else 25, alpha=0.85,
                                   label=f"{opt}{' (alpha-scaled)' if rescaled else ''}")
            if name != "log_p":
                target.set_xscale("log")
                target.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            target.set_xlabel(label + (f" [{likelihood} likelihood]" if name == "log_p" else " (loss on S)"))
            target.set_ylabel("test error")
            target.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title((f"log P(f), {likelihood} likelihood" if name == "log_p" else f"{label} of the loss on S")
                     + f", against test error{note}", fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"test_error_vs_{name}.png", dpi=110)
        plt.close(fig)
    _plot_bound(axes.flat[len(MEASURES)], shown, colours)
    axes.flat[len(MEASURES)].legend(fontsize=7, loc="upper left")
    axes.flat[0].legend(fontsize=8)
    fig_all.suptitle(f"Which measure predicts generalization? (each point: one trained network; log P(f) with the "
                     f"{likelihood} likelihood){note}")
    fig_all.tight_layout()
    fig_all.savefig(out / "summary.png", dpi=110)
    plt.close(fig_all)
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    _plot_bound(ax, shown, colours)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "pac_bayes_bound.png", dpi=110)
    plt.close(fig)


def _plot_bound(ax, rows, colours):
    """Test error against the attack set's size, beside the PAC-Bayes bound (Valle-Perez et al.) of a learner
    trained on S alone: the bound is one number, from log P(U) of S's true labels, and it bounds the expected
    error of the networks that learned S alone (|A| = 0), not of those also made to fit A's flipped labels."""
    sizes = sorted({r["attack_size"] for r in rows})
    width = (sizes[1] - sizes[0]) if len(sizes) > 1 else 1.0
    optimizers = sorted({r["optimizer"] for r in rows})
    for k, opt in enumerate(optimizers):
        pts = [r for r in rows if r["optimizer"] == opt and not r["rescaled"]]
        offset = (k - (len(optimizers) - 1) / 2) * 0.12 * width  # side by side at each |A|
        ax.scatter([r["attack_size"] + offset for r in pts], [r["test_error"] for r in pts],
                   c=colours.get(opt, "tab:gray"), s=25, alpha=0.85, label=opt)
    bounds = sorted({r["pac_bayes_bound"] for r in rows})
    if bounds:
        ax.hlines(bounds[0], sizes[0] - 0.45 * width, sizes[0] + 0.45 * width, color="k", lw=1.5, ls="--",
                  label=f"PAC-Bayes bound at |A| = 0: {bounds[0]:.3f}")
        ax.annotate("bounds the expected error of a learner\ntrained on S alone (|A| = 0), from\nlog P(U) of S's "
                    "labels; the networks at\n|A| > 0 also fit A's flipped labels", xy=(0.98, 0.04),
                    xycoords="axes fraction", ha="right", va="bottom", fontsize=7)
    ax.set_xlabel("attack-set size |A|")
    ax.set_ylabel("test error")
    ax.set_ylim(0, max([0.6] + [r["test_error"] * 1.1 for r in rows]))
    ax.grid(alpha=0.3)


def plot_leaderboard(board, out):
    """leaderboard.png: each measure's oriented Kendall tau, granulated Kendall Psi, conditional mutual information
    and robust sign error, with their intervals; blue if the alpha-rescaling cannot move the measure, orange if it
    can; beside each name, how much the rescaling moved it and its cost per network."""
    plt = pyplot()
    panels = [("kendall_tau", "Kendall tau (oriented)\n1: orders every pair right", (-1, 1)),
              ("granulated_kendall", "granulated Kendall Psi\n1: right along every axis", (-1, 1)),
              ("conditional_mutual_information", "conditional mutual information\n1: as informative as the error",
               (0, 1)),
              ("robust_sign_error", "robust sign error\n0: right in every environment", (0, 1))]
    rows = board[::-1]
    fig, axes = plt.subplots(1, len(panels), figsize=(16, 0.5 * len(rows) + 1.6), sharey=True)
    for ax, (key, title, limits) in zip(axes, panels):
        for i, b in enumerate(rows):
            value, (low, high) = b[key], b[key + "_ci"]
            colour = "tab:blue" if b["invariant"] else "tab:orange"
            if value == value:
                ax.barh(i, value, color=colour, alpha=0.75)
                if low == low and high == high:
                    ax.plot([low, high], [i, i], color="black", lw=1)
        ax.axvline(0, color="0.4", lw=0.8)
        ax.set_xlim(*limits)
        ax.set_title(title, fontsize=8)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(rows)))
    axes[0].set_yticklabels([f"{b['label']}\n(rescaling x{1 + b['rescaling_changed_it_by']:.3g}, "
                             f"{b['seconds_per_network']:.2g} s a network)" for b in rows], fontsize=7)
    fig.suptitle("Which predictor? Blue: the alpha-rescaling cannot move it; orange: it can (x its largest change); "
                 "bars: the value, lines: 95 % bootstrap intervals", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "leaderboard.png", dpi=110)
    plt.close(fig)
