"""Small widgets: a braille loss plot, a memory bar, a token-length histogram."""

from __future__ import annotations

import math

from rich.text import Text
from textual.widgets import Static

BRAILLE = 0x2800
DOTS = ((0x01, 0x08), (0x02, 0x10), (0x04, 0x20), (0x40, 0x80))  # [row][col] in a cell


def smooth(values: list[float], alpha: float = 0.1) -> list[float]:
    """Exponential moving average, debiased like TensorBoard's smoothing."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = alpha * v + (1 - alpha) * avg
        out.append(avg / (1 - (1 - alpha) ** i))
    return out


SPARKS = "▁▂▃▄▅▆▇█"
MARK = "●"  # a validation point: a whole cell, so it stands out from the braille dots


def _segment(p0: tuple[int, int], p1: tuple[int, int]):
    """The pixels of a straight line between two pixels (Bresenham)."""
    (x0, y0), (x1, y1) = p0, p1
    dx, dy = abs(x1 - x0), -abs(y1 - y0)
    sx, sy = (1 if x1 > x0 else -1), (1 if y1 > y0 else -1)
    err = dx + dy
    while True:
        yield x0, y0
        if (x0, y0) == (x1, y1):
            return
        e2 = 2 * err
        if e2 >= dy:
            err += dy
            x0 += sx
        if e2 <= dx:
            err += dx
            y0 += sy


def plot_lines(series: list[tuple], width: int, height: int, x_max: float | None = None,
               x_label: str = "step") -> list[Text]:
    """Render series into width x height braille cells with a y axis and an x axis.

    Each series is (xs, ys, style) or (xs, ys, style, kind): kind "dots" (the default),
    "line" (consecutive points joined) or "marks" (a whole-cell marker per point). The y
    axis turns logarithmic when positive values span more than a factor of 20; x_max (the
    run's total steps) fixes the right end of the x axis."""
    pts = [(x, y) for xs, ys, *_ in series for x, y in zip(xs, ys)
           if y is not None and math.isfinite(y)]
    label_w = 7
    w, h = max(width - label_w, 4), max(height, 2)
    if not pts:
        return [Text("waiting for the first steps...", style="dim")]
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    if x_max:
        x1 = max(x1, x_max)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    log_y = y0 > 0 and y1 / y0 > 20
    f = math.log10 if log_y else (lambda v: v)
    fy0, fy1 = f(y0), f(y1)
    if fy1 - fy0 < 1e-9:
        fy0, fy1 = fy0 - 0.5, fy1 + 0.5
    x1 = max(x1, x0 + 1)
    cells = [[0] * w for _ in range(h)]
    styles = [[""] * w for _ in range(h)]
    marks: dict[tuple[int, int], str] = {}

    def pixel(x, y):
        px = int(round((x - x0) / (x1 - x0) * (w * 2 - 1)))
        py = int(round((fy1 - f(y)) / (fy1 - fy0) * (h * 4 - 1)))
        return min(max(px, 0), w * 2 - 1), min(max(py, 0), h * 4 - 1)

    for xs, ys, style, *kind in series:
        kind = kind[0] if kind else "dots"
        prev = None
        for x, y in zip(xs, ys):
            if y is None or not math.isfinite(y):
                prev = None
                continue
            p = pixel(x, y)
            if kind == "marks":
                marks[(p[1] // 4, p[0] // 2)] = style
                continue
            for px, py in (_segment(prev, p) if kind == "line" and prev else [p]):
                cells[py // 4][px // 2] |= DOTS[py % 4][px % 2]
                styles[py // 4][px // 2] = style
            prev = p
    lines = []
    for row in range(h):
        label = " " * label_w
        if row in (0, h - 1) or row == h // 2:
            v = fy1 - (fy1 - fy0) * row / max(h - 1, 1)
            label = f"{10 ** v if log_y else v:6.3g} "
        t = Text(label, style="dim")
        for col in range(w):
            if (row, col) in marks:
                t.append(MARK, style=marks[(row, col)])
            else:
                t.append(chr(BRAILLE + cells[row][col]) if cells[row][col] else " ",
                         style=styles[row][col])
        lines.append(t)
    right = f"{max(xs[-1] for xs, *_ in series if len(xs)):g}/{x_max:g}" if x_max \
        else f"{x1:g}"
    mid = f"{round((x0 + x1) / 2):d}"
    axis = f"{x_label} {x0:g}"
    gap = max(w - len(axis) - len(right), 2)
    axis += (mid.center(gap) if gap > len(mid) + 4 else " " * gap) + right
    lines.append(Text(" " * label_w + axis + (" log y" if log_y else ""), style="dim"))
    return lines


def sparkline(values: list[float], width: int) -> str:
    """values as one row of block characters, each the mean of its share of the values."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals or width <= 0:
        return ""
    n = min(width, len(vals))
    buckets = [vals[i * len(vals) // n:(i + 1) * len(vals) // n] for i in range(n)]
    means = [sum(b) / len(b) for b in buckets]
    lo, hi = min(means), max(means)
    if hi - lo <= 1e-12 * max(abs(hi), 1e-30):
        return SPARKS[3] * n  # flat: a level line, not an empty-looking floor
    span = hi - lo
    return "".join(SPARKS[min(int((m - lo) / span * (len(SPARKS) - 1) + 0.5),
                              len(SPARKS) - 1)] for m in means)


def lr_schedule(config: dict, total: int, width: int) -> list[float]:
    """The run's planned learning rate at `width` points over its steps."""
    from lorafit.core.schedule import lr_at

    if not config or not total or not config.get("lr"):
        return []
    n = max(min(width, total), 1)
    return [lr_at(int(i * total / n), float(config.get("lr") or 0), total,
                  int(config.get("warmup_steps") or 0), config.get("schedule") or "cosine",
                  float(config.get("min_lr_ratio") or 0)) for i in range(n)]


class LossPlot(Static):
    """Training loss (raw dots faint, the smoothed line bold), validation points, the x axis
    to the run's total steps, the reward margin beside it when the run is preference tuning,
    and one row of sparklines: the lr schedule (the part done
    highlighted), tokens/s and the gradient norm."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.state = None  # a tui.runfiles.RunState

    def update_state(self, state) -> None:
        self.state = state
        self.refresh()

    def render(self):
        st = self.state
        width = max(self.size.width, 20)
        height = max(self.size.height - 3, 3)
        if st is None:
            return Text("waiting for the first steps...", style="dim")
        total = st.total_steps or None
        loss = [(st.steps, st.losses, "grey42"),
                (st.smoothed.xs, st.smoothed.ys, "bold cyan", "line"),
                (st.val_steps, st.val_losses, "bold magenta", "marks")]
        legend = Text("loss ", style="grey50")
        legend.append("smoothed ", style="bold cyan")
        legend.append(f"{MARK} validation", style="bold magenta")
        if not st.margin.count:  # supervised: the loss alone
            lines = [legend] + plot_lines(loss, width, height, x_max=total)
        else:
            lines = self._with_margin(loss, legend, width, height, total)
        return Text("\n").join(lines + [self._sparks(width)])

    def _with_margin(self, loss, legend, width, height, total) -> list[Text]:
        """Preference tuning: the reward margin (chosen minus rejected) beside the loss, or
        under it when the plot is narrower than two readable plots."""
        st = self.state
        margin = [(st.margin.xs, st.margin.ys, "bold green", "line")]
        m_legend = Text("reward margin", style="bold green")
        if st.accuracy.count:
            m_legend.append(f"  acc {st.accuracy.ys[-1]:.2f}", style="green")
        if width >= 60:
            left_w = (width - 2) // 2
            right_w = width - 2 - left_w
            left = [legend] + plot_lines(loss, left_w, height, x_max=total)
            right = [m_legend] + plot_lines(margin, right_w, height, x_max=total)
            rows = []
            for i in range(max(len(left), len(right))):
                row = left[i].copy() if i < len(left) else Text()
                row.truncate(left_w, pad=True)
                row.append("  ")
                if i < len(right):
                    row.append(right[i])
                rows.append(row)
            return rows
        top = max((height - 2) * 3 // 5, 2)
        return ([legend] + plot_lines(loss, width, top, x_max=total) + [m_legend]
                + plot_lines(margin, width, max(height - 2 - top, 2), x_max=total))

    def _sparks(self, width: int) -> Text:
        st = self.state
        t = Text()
        if not st.train.count:
            return t
        each = max((width - 24) // 3, 4)
        plan = lr_schedule(st.start.get("config") or {}, st.total_steps, each)
        if plan:
            done = int(len(plan) * (st.last.get("step", 0) / max(st.total_steps, 1)))
            line = sparkline(plan, each)
            t.append("lr ", style="dim")
            t.append(line[:done], style="green")
            t.append(line[done:] + " ", style="grey50")
        t.append("tok/s ", style="dim")
        t.append(sparkline(st.tokens_per_s.ys, each) + " ", style="yellow")
        t.append("gnorm ", style="dim")
        t.append(sparkline(st.grad_norm.ys, each), style="magenta")
        return t


def fmt_bytes(n) -> str:
    if not n:
        return "-"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def memory_bar(parts: list[tuple[str, int]], capacity: int | None, width: int = 40) -> Text:
    """A stacked bar of named byte counts against a capacity, with a legend. The capacity is
    a marker (┃): at the bar's end when the parts fit, inside it when they do not, and the
    cells past it are red (the overflow)."""
    palette = ["cyan", "green", "yellow", "magenta", "blue", "red", "bright_cyan",
               "bright_green", "bright_magenta", "white"]
    total = sum(v for _, v in parts)
    cells = width - 1 if capacity else width  # one cell for the capacity marker
    scale = max(capacity or 0, total, 1)
    cap_at = int(round(capacity / scale * cells)) if capacity else None
    styles = []
    for i, (_, v) in enumerate(parts):
        styles += [palette[i % len(palette)]] * int(round(v / scale * cells))
    styles = styles[:cells]
    bar = Text()
    for col in range(cells):
        if col == cap_at:
            bar.append("┃", style="bold")
        if col < len(styles):
            over = cap_at is not None and col >= cap_at
            bar.append("█", style="bold red" if over else styles[col])
        else:
            bar.append("░", style="grey35")
    if cap_at is not None and cap_at >= cells:
        bar.append("┃", style="bold")
    out = Text()
    out.append(bar)
    out.append("\n")
    if capacity:
        out.append("┃ ", style="bold")
        out.append(f"capacity {fmt_bytes(capacity)}")
        if total > capacity:
            out.append(f", over by {fmt_bytes(total - capacity)}", style="bold red")
        out.append("\n")
    for i, (name, v) in enumerate(parts):
        if v:
            out.append("■ ", style=palette[i % len(palette)])
            out.append(f"{name} {fmt_bytes(v)}\n")
    return out


def histogram(lengths: list[int], bins: int = 8, width: int = 24) -> Text:
    """Token lengths as horizontal bars."""
    if not lengths:
        return Text("no examples", style="dim")
    lo, hi = min(lengths), max(lengths)
    step = max(1, math.ceil((hi - lo + 1) / bins))
    counts = [0] * bins
    for n in lengths:
        counts[min((n - lo) // step, bins - 1)] += 1
    top = max(counts)
    t = Text()
    for i, c in enumerate(counts):
        a = lo + i * step
        t.append(f"{a:>5}-{a + step - 1:<5} ")
        t.append("▇" * max(int(c / top * width), 1 if c else 0), style="cyan")
        t.append(f" {c}\n")
    return t
