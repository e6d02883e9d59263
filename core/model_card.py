"""Model cards: the README.md the Hugging Face Hub shows for an adapter or merged folder.

The YAML header is the Hub's metadata (base_model, library_name, tags, datasets), written by
huggingface_hub's ModelCardData; the body holds the run's final losses, a loss plot (a
unicode sparkline in the text and a small SVG beside it, no plotting library) and the run's
config. Everything comes from the run folder's config.toml and metrics.jsonl, so a card can
be written at the end of training or later, for an export.
"""

from __future__ import annotations

import html
from pathlib import Path

from lorafit.core import rundir
from lorafit.core.fileio import atomic_write_text

SPARKS = "▁▂▃▄▅▆▇█"
CARD, PLOT = "README.md", "loss.svg"


def sparkline(values: list[float], width: int = 48) -> str:
    """The values resampled to `width` buckets (their means), one block character each."""
    if not values:
        return ""
    n = min(width, len(values))
    buckets = [values[i * len(values) // n:(i + 1) * len(values) // n] for i in range(n)]
    means = [sum(b) / len(b) for b in buckets]
    lo, hi = min(means), max(means)
    span = (hi - lo) or 1.0
    return "".join(SPARKS[min(int((v - lo) / span * len(SPARKS)), len(SPARKS) - 1)]
                   for v in means)


def loss_svg(train: list[tuple[int, float]], val: list[tuple[int, float]],
             width: int = 480, height: int = 160) -> str:
    """Training (and validation) loss against step as a small standalone SVG."""
    pts = train + val
    if not pts:
        return ""
    x0, x1 = min(s for s, _ in pts), max(s for s, _ in pts)
    y0, y1 = min(v for _, v in pts), max(v for _, v in pts)
    pad = 28

    def xy(s, v):
        x = pad + (s - x0) / ((x1 - x0) or 1) * (width - 2 * pad)
        y = height - pad - (v - y0) / ((y1 - y0) or 1) * (height - 2 * pad)
        return f"{x:.1f},{y:.1f}"

    val_label = ' · <tspan fill="#ff7f0e">validation</tspan>' if val else ""
    lines = []
    for series, color in ((train, "#1f77b4"), (val, "#ff7f0e")):
        if series:
            lines.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" '
                         f'points="{" ".join(xy(s, v) for s, v in series)}"/>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'font-family="sans-serif" font-size="10">'
            f'<rect width="100%" height="100%" fill="white"/>'
            f'<text x="{pad}" y="14">loss {y1:.3f}</text>'
            f'<text x="{pad}" y="{height - 8}">{y0:.3f} · step {x0}–{x1} · '
            f'<tspan fill="#1f77b4">train</tspan>'
            f'{val_label}</text>'
            + "".join(lines) + "</svg>\n")


def _is_hub_id(name: str | None) -> bool:
    return bool(name) and name.count("/") == 1 and not Path(name).exists() and \
        not name.startswith((".", "/", "~"))


def run_summary(run_dir: str | Path) -> dict:
    """config text, train/val loss series and the final status of a run folder."""
    run_dir = Path(run_dir)
    cfg_path = rundir.config_path(run_dir)
    config = cfg_path.read_text() if cfg_path.exists() else ""
    train, val, end = [], [], {}
    if rundir.metrics_path(run_dir).exists():
        for r in rundir.read_metrics(run_dir):
            if r.get("kind") == "train" and isinstance(r.get("loss"), (int, float)):
                train.append((r["step"], float(r["loss"])))
            elif r.get("kind") == "eval" and isinstance(r.get("val_loss"), (int, float)):
                val.append((r["step"], float(r["val_loss"])))
            elif r.get("kind") == "end":
                end = r
    return {"config": config, "train": train, "val": val, "end": end}


def _config_values(config_text: str) -> dict:
    from lorafit.core.config import tomllib

    try:
        return tomllib.loads(config_text) if config_text else {}
    except ValueError:
        return {}


def card_text(base_model: str | None, kind: str, summary: dict, title: str) -> str:
    """README.md for an adapter (kind "adapter"), a merged model ("merged") or GGUF files
    ("gguf")."""
    from huggingface_hub import ModelCardData

    values = _config_values(summary["config"])
    data = values.get("data") or values.get("dataset")
    tags = ["lorafit", "lora", "text-generation"] + (["gguf", "llama.cpp", "ollama"]
                                                     if kind == "gguf" else [])
    library = {"adapter": "peft", "merged": "transformers"}.get(kind)
    meta = dict(tags=tags, pipeline_tag="text-generation")
    if library:
        meta["library_name"] = library
    if base_model:
        meta["base_model"] = base_model
        tags.append(f"base_model:{'adapter' if kind == 'adapter' else 'finetune'}:{base_model}")
    if _is_hub_id(data):
        meta["datasets"] = [data]
    body = [f"# {title}", ""]
    what = {"adapter": "A LoRA adapter", "merged": "A model merged from a LoRA adapter",
            "gguf": "GGUF files (llama.cpp, Ollama) of a LoRA fine-tune"}[kind]
    body.append(f"{what} for `{base_model or 'its base model'}`, trained with lorafit"
                + (f" on `{data}`." if data else "."))
    train, val, end = summary["train"], summary["val"], summary["end"]
    if train:
        body += ["", "## Training", "", "| | |", "|---|---|",
                 f"| steps | {train[-1][0]} |", f"| final training loss | {train[-1][1]:.4f} |"]
        if val:
            body.append(f"| final validation loss | {val[-1][1]:.4f} |")
            body.append(f"| best validation loss | {min(v for _, v in val):.4f} |")
        if end.get("status"):
            body.append(f"| run ended | {end['status']} |")
        body += ["", f"Training loss: `{sparkline([v for _, v in train])}`", "",
                 f"![loss]({PLOT})"]
    if kind == "adapter":
        body += ["", "## Use", "", "```python", "from peft import AutoPeftModelForCausalLM",
                 "model = AutoPeftModelForCausalLM.from_pretrained(\"REPO_OR_FOLDER\")", "```"]
    if kind == "gguf":
        body += ["", "## Use", "", "```bash", "ollama create my-model -f Modelfile",
                 "ollama run my-model", "```"]
    if summary["config"]:
        body += ["", "## Config", "", "```toml", summary["config"].strip(), "```"]
    return f"---\n{ModelCardData(**meta).to_yaml()}\n---\n\n" + "\n".join(body) + "\n"


def write_card(folder: str | Path, base_model: str | None, kind: str,
               run_dir: str | Path | None) -> Path:
    """README.md (and loss.svg when there are losses) into `folder`."""
    folder = Path(folder)
    summary = run_summary(run_dir) if run_dir else {"config": "", "train": [], "val": [],
                                                   "end": {}}
    title = Path(run_dir).name if run_dir else folder.name
    if summary["train"]:
        atomic_write_text(folder / PLOT, loss_svg(summary["train"], summary["val"]))
    path = folder / CARD
    atomic_write_text(path, card_text(base_model, kind, summary, html.escape(title)))
    return path


def run_dir_of(adapter_dir: str | Path) -> Path | None:
    """The run folder an adapter folder belongs to (RUN/adapter, RUN/best-adapter,
    RUN/checkpoints/step-N), or None."""
    p = Path(adapter_dir).resolve()
    for cand in (p.parent, p.parent.parent):
        if rundir.metrics_path(cand).exists():
            return cand
    return None


class ModelCardSink:
    """Writes the card into the run's adapter folder when the run ends (an event sink: it
    comes after the metrics sink, so the card sees the final records)."""

    def __init__(self, run_dir: str | Path, base_model: str | None):
        self.run_dir, self.base_model = Path(run_dir), base_model

    def __call__(self, event) -> None:
        from lorafit.core.events import RunFinished

        if isinstance(event, RunFinished) and event.adapter:
            try:
                write_card(event.adapter, self.base_model, "adapter", self.run_dir)
            except Exception as e:  # a card is a courtesy: never fail a finished run for it
                import sys

                print(f"warning: no model card written ({e})", file=sys.stderr)

    def close(self) -> None:
        pass
