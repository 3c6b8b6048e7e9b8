"""Results for people: a terminal table and a PNG of accuracy per turn."""

from __future__ import annotations

from collections.abc import Sequence

SUMMARY_KEYS = ("m1@t1", "m{k}@t1", "p{k}@t1", "m1@t{T}", "p1@t{T}", "wrong_to_right", "right_to_wrong",
                "tie_rate", "tie_rate_parallel")


def summary_columns(m: dict) -> list[str]:
    return [c.format(k=m["parallel"], T=m["turns"]) for c in SUMMARY_KEYS]


def percent(m: dict, key: str) -> str:
    """A metric as a percentage; "-" where the row lacks it (metrics written before it existed)."""
    v = m.get(key)
    return "-" if v is None else f"{100 * v:.1f}"


def format_table(rows: Sequence[dict], title: str = "RISE evaluation") -> str:
    """Rows of metrics (each with an optional 'iteration') as a table, percentages."""
    from rich.console import Console
    from rich.table import Table

    cols = summary_columns(rows[0])
    table = Table(title=title)
    table.add_column("iter", justify="right")
    for c in [*cols, "acc by turn"]:
        table.add_column(c, justify="right")
    for m in rows:
        cells = [percent(m, c) for c in cols]
        turns = " ".join(f"{100 * a:.0f}" for a in m["acc_by_turn"])
        table.add_row(str(m.get("iteration", "-")), *cells, turns)
    console = Console(width=160, record=True)
    with console.capture() as cap:
        console.print(table)
    return cap.get()


def plot_turns(rows: Sequence[dict], path: str, title: str = "Accuracy per turn (no oracle)") -> None:
    """One line per iteration: accuracy at each turn; dashed: the parallel m{k}@t1 baseline."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rise_ray.files import atomic_write_bytes

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for m in rows:
        turns = range(1, len(m["acc_by_turn"]) + 1)
        label = f"iter {m['iteration']}" if "iteration" in m else "model"
        (line,) = ax.plot(turns, [100 * a for a in m["acc_by_turn"]], marker="o", label=label)
        k = m["parallel"]
        ax.axhline(100 * m[f"m{k}@t1"], color=line.get_color(), linestyle="--", linewidth=1,
                   label=f"{label}: m{k}@t1")
    ax.set_xticks(range(1, max(len(m["acc_by_turn"]) for m in rows) + 1))
    ax.set_xlabel("turn")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
