"""Training history: a JSONL log (one record per line) and PNG plots of its curves.

Records carry ``type`` ("train", "eval" or "bad_step") and ``step``. Train records hold the loss
terms, learning rate, gradient norm and throughput; eval records the metrics in percent. On a
resume, records after the checkpoint's step (written by the interrupted run and about to be
redone) are dropped, so the log reads like one uninterrupted run.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from occdistill.io import atomic_write_bytes, atomic_write_text

EVAL_CURVES = ("mIoU", "IoU", "RayIoU")
_NOT_LOSSES = {"type", "step", "epoch", "lr", "grad_norm", "samples_per_s", "step_seconds"}


class History:
    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = path
        kept = [r for r in read_records(path) if r["step"] <= resume_step] if resume_step is not None else []
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file = open(path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a log; a torn last line (a crash mid-write) is skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def plot_curves(records: list[dict[str, Any]], out: Path, title: str = "") -> Path:
    """Loss terms (log scale), learning rate and evaluation metrics against the step, as one PNG."""
    # The object API with an explicit Agg canvas: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train = [r for r in records if r["type"] == "train"]
    evals = [r for r in records if r["type"] == "eval"]
    fig = Figure(figsize=(13, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax_loss, ax_lr, ax_eval = fig.subplots(1, 3)
    terms = [k for k in (train[0] if train else {}) if k not in _NOT_LOSSES]
    for term in terms:
        ax_loss.plot([r["step"] for r in train], [r[term] for r in train], label=term)
    ax_loss.set(title="training loss", xlabel="step", yscale="log" if train else "linear")
    ax_lr.plot([r["step"] for r in train], [r["lr"] for r in train], color="tab:gray")
    ax_lr.set(title="learning rate", xlabel="step")
    for name in EVAL_CURVES:
        points = [(r["step"], r[name]) for r in evals if r.get(name) is not None]
        if points:
            ax_eval.plot(*zip(*points), marker="o", label=name)
    ax_eval.set(title="validation (%)", xlabel="step")
    for ax in (ax_loss, ax_eval):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    for ax in (ax_loss, ax_lr, ax_eval):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return atomic_write_bytes(out, buf.getvalue())
