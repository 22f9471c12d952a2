"""Evaluation reports: JSON, a Markdown summary with tables, and PNG plots.

The report is a dict with optional sections 'perplexity' (from `loss_by_position`), 'mqar'
(from `mqar_grid`), 'passkey' (from `passkey_grid`), 'niah' (from `niah.niah_grid`; with its
opt-in RULER fields, a table of RULER's string_match_all too), 'memory' (what host memory did,
from `memory.report_section`) and free-form 'meta'. `write_report`
puts `report.json`, `report.md`, `loss_by_position.png`, `passkey_heatmap.png`,
`mqar_heatmap.png`, `niah_heatmaps.png` and `niah_by_length.png` (for the sections present) in a
directory and returns their paths. Plots over lengths or positions mark
the trained length (meta['trained_length']) and, for a checkpoint trained with host memory, the
span its memory training read (meta['memory_span']).
"""
from __future__ import annotations

import json
import math
import os

import numpy as np

from sosm_jax.eval.niah import GENERATE_MARGIN
from sosm_jax.eval.recall import grid_matrix

_PLOTS = {"loss_plot": "loss_by_position.png", "passkey_heatmap": "passkey_heatmap.png",
          "mqar_heatmap": "mqar_heatmap.png", "niah_heatmaps": "niah_heatmaps.png",
          "niah_by_length": "niah_by_length.png"}


def fmt(x, pct: bool = False) -> str:
  """A number for a table: 4 significant digits, or a percentage with one decimal; – if absent."""
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return "–"
  return f"{100 * x:.1f}" if pct else f"{x:.4g}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _grid_table(cells, row_key, col_key, row_name, col_fmt) -> str:
  rows, cols, matrix = grid_matrix(cells, row_key, col_key)
  header = [row_name] + [col_fmt(c) for c in cols]
  body = [[str(r)] + [fmt(v, pct=True) for v in matrix[i]] for i, r in enumerate(rows)]
  return markdown_table(header, body)


def to_markdown(report: dict) -> str:
  """The report as Markdown: a summary line per task, then one table per task."""
  out = ["# Evaluation report", ""]
  meta = report.get("meta", {})
  if meta:
    out += [", ".join(f"{k}: {v}" for k, v in meta.items() if not isinstance(v, (dict, list))), ""]
  mem = report.get("memory")
  if mem:
    out += [f"Host memory: {mem['windows']} windows of {mem['window']} tokens scored, "
            f"{mem['memory_edges']} memory edges retrieved "
            f"({fmt(mem['valid_fraction'], pct=True)}% of the top-{mem['top_k']} slots).", ""]
  ppl = report.get("perplexity")
  if ppl:
    out += [f"## Loss by position (held-out text, {ppl['tokens']} tokens)", "",
            f"Overall loss {fmt(ppl['loss'])}, perplexity {fmt(ppl['perplexity'])}. "
            + _trend_sentence(ppl), ""]
    out.append(markdown_table(
        ["positions", "tokens", "loss", "perplexity", "accuracy %"],
        [[f"{b['start']}–{b['end'] - 1}", str(b["tokens"]), fmt(b["loss"]),
          fmt(b["perplexity"]), fmt(b["accuracy"], pct=True)] for b in ppl["buckets"]]))
    out.append("")
  mqar = report.get("mqar")
  if mqar:
    out += [f"## MQAR accuracy % (rows: length, columns: key-value pairs; "
            f"{mqar['num_examples']} examples per cell, chance {fmt(mqar['chance'], pct=True)}%)",
            "", f"Mean over cells: {fmt(mqar['mean_accuracy'], pct=True)}%.", "",
            _grid_table(mqar["cells"], "length", "num_pairs", "length", str), ""]
  pk = report.get("passkey")
  if pk:
    out += [f"## Passkey accuracy % (rows: length, columns: depth; {pk['num_examples']} "
            f"examples per cell, exact match of {pk['digits']} digits)", "",
            f"Mean over cells: {fmt(pk['mean_accuracy'], pct=True)}%.", "",
            _grid_table(pk["cells"], "length", "depth", "length", lambda d: f"{d:.2f}"), ""]
  nh = report.get("niah")
  if nh:
    out += _niah_markdown(nh, meta.get("trained_length"))
  if "average_recall" in report:
    tasks = " and ".join(t for t in ("MQAR", "passkey", "NIAH") if report.get(t.lower()))
    out += [f"Average recall (mean of the {tasks} means): "
            f"{fmt(report['average_recall'], pct=True)}%", ""]
  return "\n".join(out)


def niah_by_length(niah: dict, field: str = "accuracy") -> tuple[list[str], list[int], np.ndarray]:
  """(task names, lengths, the cells' `field` [tasks, lengths] averaged over depths; NaN if none
  scored)."""
  names = list(niah["tasks"])
  lengths = sorted({c["length"] for t in niah["tasks"].values() for c in t["cells"]})
  matrix = np.full((len(names), len(lengths)), np.nan)
  for i, name in enumerate(names):
    for j, length in enumerate(lengths):
      accs = [c[field] for c in niah["tasks"][name]["cells"]
              if c["length"] == length and c.get(field) is not None]
      if accs:
        matrix[i, j] = float(np.mean(accs))
  return names, lengths, matrix


def _niah_markdown(niah: dict, trained) -> list[str]:
  names, lengths, matrix = niah_by_length(niah)
  mark = lambda n: f"{n}*" if n == trained else str(n)
  out = [f"## Needle in a haystack accuracy % (rows: task, columns: length, mean over depths "
         f"{', '.join(f'{d:g}' for d in niah['depths'])}; {niah['num_examples']} examples per "
         f"cell, exact match of the whole answer; * = trained length)", "",
         f"Mean over tasks: {fmt(niah['mean_accuracy'], pct=True)}%.", "",
         markdown_table(["task"] + [mark(n) for n in lengths],
                        [[name] + [fmt(v, pct=True) for v in matrix[i]]
                         for i, name in enumerate(names)]), ""]
  cells = [c for t in niah["tasks"].values() for c in t["cells"]]
  by_depth = []
  for length in lengths:
    row = [mark(length)]
    for depth in niah["depths"]:
      accs = [c["accuracy"] for c in cells if c["length"] == length and c["depth"] == depth
              and c["accuracy"] is not None]
      row.append(fmt(float(np.mean(accs)) if accs else None, pct=True))
    by_depth.append(row)
  out += ["By depth (mean over tasks):", "",
          markdown_table(["length"] + [f"{d:.2f}" for d in niah["depths"]], by_depth), ""]
  return out + _niah_values_markdown(niah, mark) + _niah_ruler_markdown(niah, mark)


def _niah_ruler_markdown(niah: dict, mark) -> list[str]:
  """RULER's string_match_all (greedy generation, values in any order) per task x length, when
  the grid generated (niah_grid's generator); [] otherwise."""
  if niah.get("ruler_mean") is None:
    return []
  names, lengths, matrix = niah_by_length(niah, "ruler_score")
  return ["## NIAH, RULER's order-free metric (string_match_all)", "",
          f"Greedy generation from each prompt (at most the answer's tokens + {GENERATE_MARGIN}, "
          "through the first '.'), scored per example as the fraction of the answer's values "
          "found in it (case-insensitive, any order), as RULER scores these tasks; % per task x "
          "length, mean over depths.", "",
          f"Mean over tasks: {fmt(niah['ruler_mean'], pct=True)}%.", "",
          markdown_table(["task"] + [mark(n) for n in lengths],
                         [[name] + [fmt(v, pct=True) for v in matrix[i]]
                          for i, name in enumerate(names)]), ""]


def _niah_values_markdown(niah: dict, mark) -> list[str]:
  """Answer tokens right, each listed value's exact match, and where wrong values came from."""
  rows = []
  for name, task in niah["tasks"].items():
    for length in sorted({c["length"] for c in task["cells"]}):
      cells = [c for c in task["cells"] if c["length"] == length and "value_accuracy" in c]
      if not cells:
        continue
      per_value = np.mean([c["value_accuracy"] for c in cells], axis=0)
      wrong = sum(c["wrong_values"] for c in cells)
      other = sum(c["wrong_values_other_needle"] for c in cells)
      rows.append([name, mark(length),
                   fmt(float(np.mean([c["token_accuracy"] for c in cells])), pct=True),
                   " / ".join(fmt(float(v), pct=True) for v in per_value), f"{other} of {wrong}"])
  if not rows:
    return []
  return ["Value by value (mean over depths; teacher forced): answer tokens right, exact match "
          "of the answer's 1st / 2nd / ... value, and of the values begun with a wrong token, "
          "how many began as another needle's value (the needle chosen wrong; the rest are slips "
          "or no needle):", "",
          markdown_table(["task", "length", "answer tokens right %", "value exact %",
                          "wrong values from another needle"], rows), ""]


def _trend_sentence(ppl: dict) -> str:
  if ppl.get("context_gain") is None:
    return ""
  falling = "still falling" if ppl["still_falling"] else "no longer falling"
  return (f"Loss is {fmt(ppl['context_gain'])} nats lower in the last bucket than in the first, "
          f"and {falling} at the end.")


_MARK_STYLES = ("--", ":")  # the trained length, the memory span


def length_row_boundary(rows, length) -> float | None:
  """y of the line between the rows (lengths, ascending) within and beyond `length` (a marked
  length: the trained one, the memory span); None when every row is within it or it is unknown."""
  if not length or not rows or rows[-1] <= length:
    return None
  return sum(r <= length for r in rows) - 0.5


def length_marks(meta: dict) -> list[tuple[int, str]]:
  """The lengths the plots mark, [(length, label)]: the trained length and, for a checkpoint
  trained with host memory, the span its memory training read (windows x segments)."""
  marks = []
  if meta.get("trained_length"):
    marks.append((int(meta["trained_length"]), "trained"))
  if meta.get("memory_span") and meta["memory_span"] != meta.get("trained_length"):
    marks.append((int(meta["memory_span"]), "memory span"))
  return marks


def _heatmap(path: str, matrix: np.ndarray, rows, cols, xlabel: str, ylabel: str, title: str,
             col_fmt=str, marks=()) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(1.1 * len(cols) + 2.5, 0.55 * len(rows) + 1.8))
  _heatmap_axes(ax, matrix, rows, cols, xlabel, ylabel, title, col_fmt, marks, colorbar=True)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _heatmap_axes(ax, matrix, rows, cols, xlabel, ylabel, title, col_fmt, marks, colorbar):
  """One accuracy heatmap on `ax`: rows (lengths) bottom to top; the `length_marks` marked."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  masked = np.ma.masked_invalid(100 * matrix)
  cmap = matplotlib.colormaps["RdYlGn"].with_extremes(bad="#dddddd")
  im = ax.imshow(masked, cmap=cmap, vmin=0, vmax=100, aspect="auto", origin="lower")
  ax.set_xticks(range(len(cols)), [col_fmt(c) for c in cols])
  labels = {length: label for length, label in marks}
  ax.set_yticks(range(len(rows)), [f"{r} ({labels[r]})" if r in labels else str(r) for r in rows])
  for i in range(len(rows)):
    for j in range(len(cols)):
      text = "n/a" if np.isnan(matrix[i, j]) else f"{100 * matrix[i, j]:.0f}"
      ax.text(j, i, text, ha="center", va="center", fontsize=8)
  for (length, label), style in zip(marks, _MARK_STYLES):
    boundary = length_row_boundary(rows, length)
    if boundary is not None:
      ax.axhline(boundary, color="black", linestyle=style, linewidth=1.2)
      ax.text(len(cols) - 0.5, boundary, f" {label} {length}", va="bottom", ha="right", fontsize=7)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  if colorbar:
    ax.figure.colorbar(im, ax=ax, label="accuracy %")


def _mark_lines(ax, marks, beyond=0) -> None:
  """Vertical lines at the `length_marks` (those below `beyond` only, if given)."""
  for (length, label), style in zip(marks, _MARK_STYLES):
    if not beyond or beyond > length:
      ax.axvline(length, color="black", linestyle=style, linewidth=1.2, label=f"{label} ({length})")


def plot_niah(heatmaps_path: str, lines_path: str, niah: dict, marks=()) -> None:
  """A length x depth heatmap per task (one figure) and accuracy against length per task."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  names = list(niah["tasks"])
  ncols = min(4, len(names))
  nrows = -(-len(names) // ncols)
  lengths = sorted({c["length"] for t in niah["tasks"].values() for c in t["cells"]})
  depths = niah["depths"]
  fig, axes = plt.subplots(nrows, ncols, squeeze=False,
                           figsize=(ncols * (0.8 * len(depths) + 2.4),
                                    nrows * (0.5 * len(lengths) + 1.6)))
  for ax, name in zip(axes.ravel(), names):
    rows, cols, matrix = grid_matrix(niah["tasks"][name]["cells"], "length", "depth")
    _heatmap_axes(ax, matrix, rows, cols, "needle depth", "context length", name,
                  lambda d: f"{d:.2f}", marks, colorbar=False)
  for ax in axes.ravel()[len(names):]:
    ax.axis("off")
  fig.suptitle("Needle in a haystack: exact-match accuracy (%)")
  fig.tight_layout()
  fig.savefig(heatmaps_path, dpi=100)
  plt.close(fig)

  names, lengths, matrix = niah_by_length(niah)
  fig, ax = plt.subplots(figsize=(6.5, 4))
  for i, name in enumerate(names):
    ax.plot(lengths, 100 * matrix[i], marker="o", label=name)
  _mark_lines(ax, marks)
  ax.set_xscale("log", base=2)
  ax.set_ylim(-3, 103)
  ax.set_xlabel("context length (tokens)")
  ax.set_ylabel("accuracy % (mean over depths)")
  ax.set_title("Needle in a haystack by length")
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(lines_path, dpi=110)
  plt.close(fig)


def plot_loss_by_position(path: str, ppl: dict, title: str = "Loss by position",
                          marks=()) -> None:
  """Mean loss per bucket against the bucket's centre position (log x axis)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  pts = [(max(1.0, 0.5 * (b["start"] + b["end"] - 1)), b["loss"]) for b in ppl["buckets"]
         if b["loss"] is not None]
  fig, ax = plt.subplots(figsize=(6, 4))
  if pts:
    x, y = zip(*pts)
    ax.plot(x, y, marker="o")
  _mark_lines(ax, marks, beyond=ppl["edges"][-1])  # only lengths the plotted positions pass
  if ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=8)
  ax.set_xscale("log", base=2)
  ax.set_xlabel("position in document (bucket centre)")
  ax.set_ylabel("loss (nats / token)")
  ax.set_title(title)
  ax.grid(True, alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_report(report: dict, out_dir: str) -> dict[str, str]:
  """Writes report.json, report.md and the plots of the sections present; returns their paths."""
  os.makedirs(out_dir, exist_ok=True)
  paths = {"json": os.path.join(out_dir, "report.json"),
           "markdown": os.path.join(out_dir, "report.md")}
  with open(paths["json"], "w", encoding="utf-8") as f:
    json.dump(report, f, indent=2, default=str)
  with open(paths["markdown"], "w", encoding="utf-8") as f:
    f.write(to_markdown(report))
  for name in _PLOTS.values():  # plots of an earlier run with other tasks would mislead
    if os.path.exists(os.path.join(out_dir, name)):
      os.remove(os.path.join(out_dir, name))
  marks = length_marks(report.get("meta", {}))
  if report.get("perplexity"):
    paths["loss_plot"] = os.path.join(out_dir, _PLOTS["loss_plot"])
    plot_loss_by_position(paths["loss_plot"], report["perplexity"], marks=marks)
  if report.get("passkey"):
    rows, cols, matrix = grid_matrix(report["passkey"]["cells"], "length", "depth")
    paths["passkey_heatmap"] = os.path.join(out_dir, _PLOTS["passkey_heatmap"])
    _heatmap(paths["passkey_heatmap"], matrix, rows, cols, "needle depth", "context length",
             "Passkey accuracy (%)", col_fmt=lambda d: f"{d:.2f}", marks=marks)
  if report.get("mqar"):
    rows, cols, matrix = grid_matrix(report["mqar"]["cells"], "length", "num_pairs")
    paths["mqar_heatmap"] = os.path.join(out_dir, _PLOTS["mqar_heatmap"])
    _heatmap(paths["mqar_heatmap"], matrix, rows, cols, "key-value pairs", "sequence length",
             "MQAR accuracy (%)")
  if report.get("niah"):
    paths["niah_heatmaps"] = os.path.join(out_dir, _PLOTS["niah_heatmaps"])
    paths["niah_by_length"] = os.path.join(out_dir, _PLOTS["niah_by_length"])
    plot_niah(paths["niah_heatmaps"], paths["niah_by_length"], report["niah"], marks=marks)
  return paths
