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


def plot_lines(series: list[tuple[list, list, str]], width: int, height: int) -> list[Text]:
    """Render (xs, ys, style) series into width x height braille cells with a y axis."""
    pts = [(x, y) for xs, ys, _ in series for x, y in zip(xs, ys) if math.isfinite(y)]
    label_w = 7
    w, h = max(width - label_w, 4), max(height, 2)
    if not pts:
        return [Text("waiting for the first steps...", style="dim")]
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    if y1 - y0 < 1e-9:
        y0, y1 = y0 - 0.5, y1 + 0.5
    x1 = max(x1, x0 + 1)
    cells = [[0] * w for _ in range(h)]
    styles = [[""] * w for _ in range(h)]
    for xs, ys, style in series:
        for x, y in zip(xs, ys):
            if not math.isfinite(y):
                continue
            px = int((x - x0) / (x1 - x0) * (w * 2 - 1))
            py = int((y1 - y) / (y1 - y0) * (h * 4 - 1))
            cx, cy = px // 2, py // 4
            cells[cy][cx] |= DOTS[py % 4][px % 2]
            styles[cy][cx] = style
    lines = []
    for row in range(h):
        label = f"{y1 - (y1 - y0) * row / max(h - 1, 1):6.3f} " if row in (0, h - 1) or \
            row == h // 2 else " " * label_w
        t = Text(label, style="dim")
        for col in range(w):
            t.append(chr(BRAILLE + cells[row][col]) if cells[row][col] else " ",
                     style=styles[row][col])
        lines.append(t)
    lines.append(Text(" " * label_w + f"step {x0:g}".ljust(w - 10) + f"{x1:g}".rjust(10),
                      style="dim"))
    return lines


class LossPlot(Static):
    """Training loss (raw dots, smoothed line) and validation loss over steps."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.series = ([], [], [], [], ([], []))  # steps, losses, val, smoothed

    def update_series(self, steps, losses, val_steps, val_losses, smoothed=None) -> None:
        """smoothed: (xs, ys) folded in as records arrived (runfiles.RunState); otherwise
        computed here from the losses."""
        smoothed = smoothed or (steps, smooth(losses))
        self.series = (list(steps), list(losses), list(val_steps), list(val_losses),
                       (list(smoothed[0]), list(smoothed[1])))
        self.refresh()

    def render(self):
        steps, losses, vs, vl, (ss, sl) = self.series
        width = max(self.size.width, 20)
        height = max(self.size.height - 2, 3)
        lines = plot_lines([(steps, losses, "grey50"), (ss, sl, "bold cyan"),
                            (vs, vl, "bold magenta")], width, height)
        legend = Text("loss ", style="grey50")
        legend.append("smoothed ", style="bold cyan")
        legend.append("validation", style="bold magenta")
        return Text("\n").join([legend] + lines)


def fmt_bytes(n) -> str:
    if not n:
        return "-"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def memory_bar(parts: list[tuple[str, int]], capacity: int | None, width: int = 40) -> Text:
    """A stacked bar of named byte counts against a capacity, with a legend."""
    palette = ["cyan", "green", "yellow", "magenta", "blue", "red", "bright_cyan",
               "bright_green", "bright_magenta", "white"]
    total = sum(v for _, v in parts)
    scale = max(capacity or 0, total, 1)
    bar = Text()
    used = 0
    for i, (_, v) in enumerate(parts):
        n = int(round(v / scale * width))
        bar.append("█" * n, style=palette[i % len(palette)])
        used += n
    bar.append("░" * max(width - used, 0), style="grey35")
    out = Text()
    out.append(bar)
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
