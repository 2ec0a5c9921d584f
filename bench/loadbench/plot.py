"""The run's PNG: CPU time per datagram (left) and capacity (right), per scenario and target.

Bars are medians; CPU error bars span min..max of the interleaved rounds. A
hatched capacity bar is generator-bound: the target's capacity is at least
that (the generator could not offer more).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

COLORS = {"c-forward": "#777777", "nginx": "#2a9d8f", "quiclb": "#e76f51"}


def write_plot(doc: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib  # noqa: PLC0415 - optional: the JSON is the result, the plot a view of it

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        print("matplotlib is not installed (make bench-quick installs it): no plot", flush=True)
        return None
    scenarios = doc["scenarios"]
    # The C ceiling counts as generator-bound too when the scenario found it unsaturated.
    labels = [(sc["scenario"], name, {**t, "bound": t["capacity"]["generator_bound"]
                                      or (name == "c-forward" and bool(sc.get("ceiling_generator_bound")))})
              for sc in scenarios for name, t in sc["targets"].items()]
    if not labels:
        return None
    fig, (ax_cpu, ax_cap) = plt.subplots(1, 2, figsize=(13, 0.34 * len(labels) + 2.2), sharey=True)
    ys = list(range(len(labels)))[::-1]
    for y, (_scn, _name, t) in zip(ys, labels, strict=True):
        color = COLORS.get(t["kind"], "#444444")
        cpu = t.get("cpu", {})
        med = cpu.get("cpu_us_median")
        if med is not None:
            err = [[max(0.0, med - cpu["cpu_us_min"])], [max(0.0, cpu["cpu_us_max"] - med)]]
            ax_cpu.barh(y, med, color=color, xerr=err, capsize=2)
            ax_cpu.text(cpu["cpu_us_max"], y, f"  {med:.2f}", va="center", fontsize=7)
        cap = t["capacity"]
        c = cap["capacity"] / 1000
        ax_cap.barh(y, c, color=color, hatch="//" if t["bound"] else None, edgecolor="black", linewidth=0.3)
        ax_cap.text(c, y, (" >=" if t["bound"] else " ") + f"{c:.0f}k", va="center", fontsize=7)
    ax_cpu.set_yticks(ys, [f"{scn}: {name}" for scn, name, _ in labels], fontsize=8)
    fixed = sorted({sc.get("fixed_rate", 0) for sc in scenarios})
    ax_cpu.set_xlabel(f"CPU us per delivered datagram at a fixed load\n({', '.join(f'{r // 1000}k' for r in fixed)}"
                      "/s per scenario), median and min..max of the rounds", fontsize=9)
    ax_cap.set_xlabel("capacity, thousand datagrams/s at <= 0.1% loss\n(hatched: generator-bound, a lower bound)",
                      fontsize=9)
    for ax in (ax_cpu, ax_cap):
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"quiclb load benchmark, commit {doc.get('commit', '?')}, {doc.get('cpus')} CPUs, "
                 f"Python {doc.get('python')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
