"""Results a person can read: the accuracy matrix as a text table, and three PNGs drawn with
pillow: the matrix as a heatmap, each task's score across the stages, and the loss curves."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .checkpoint import atomic_write
from .metrics import tasks_answered_per_row

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34)]


def _answered(results: dict) -> list[int]:
    tasks = results["tasks"]
    return tasks_answered_per_row(results.get("stages") or [[j] for j in range(len(tasks))], len(tasks))


def row_labels(results: dict) -> list[str]:
    """"base", then per row the task it stands for; a stage that trained several tasks at once
    (the joint baseline) gives each of them the same row, labelled with the stage."""
    tasks = results["tasks"]
    stages = results.get("stages") or [[j] for j in range(len(tasks))]
    labels = ["base"]
    for s, stage in enumerate(stages, 1):
        labels += [tasks[j] if len(stage) == 1 else f"stage {s}" for j in stage]
    return [labels[0]] + [f"{k} {label}" for k, label in enumerate(labels[1:], 1)]


def _matrix_table(results: dict, key: str, title: str) -> list[str]:
    tasks = results["tasks"]
    width = max(9, *(len(t) for t in tasks)) + 1
    lines = [title, "stage".ljust(12) + "".join(t.rjust(width) for t in tasks)]
    for row, label, m in zip(results[key], row_labels(results), _answered(results)):
        # None: "-" where the task was not answered (metrics.tasks_answered_per_row), else "n/a" (cannot be scored)
        lines.append(label[:11].ljust(12) + "".join(("-" if j >= m else "n/a").rjust(width) if v is None
                                                    else f"{v:{width}.1f}" for j, v in enumerate(row)))
    s = results.get(key.replace("acc_matrix", "summary"))
    if s:
        keys = [k for k in ("AP", "MAP", "BWT", "ACC", "MFT", "FWT", "MIF") if k in s]
        lines.append("  ".join(f"{k} {'n/a' if s[k] is None else format(s[k], '.2f')}" for k in keys))
    return lines


def text_table(results: dict) -> str:
    """The primary protocol's matrix and summary; the other protocol's below it where it differs."""
    primary = results.get("protocol", "robust")
    lines = _matrix_table(results, "acc_matrix", f"{results['method']} — {primary} score (%) on each task "
                                                 "(columns) after each stage (rows)")
    for key in (k for k in results if k.startswith("acc_matrix_")):
        if results[key] != results["acc_matrix"]:
            other = key[len("acc_matrix_"):]
            lines += [""] + _matrix_table(results, key, f"{other} protocol (n/a: that protocol cannot score it)")
    if results.get("selector_accuracy") is not None:
        lines.append(f"selector accuracy {results['selector_accuracy']:.1f}%")
    return "\n".join(lines)


def _font(size: int):
    return ImageFont.load_default(size=size)


def heatmap(results: dict, path: Path) -> None:
    a, tasks = results["acc_matrix"], results["tasks"]
    cell, left, top = 70, 110, 60
    img = Image.new("RGB", (left + cell * len(tasks) + 20, top + cell * len(a) + 20), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 10), f"{results['method']}: score after each stage", fill="black", font=_font(16))
    for j, t in enumerate(tasks):
        d.text((left + j * cell + 2, top - 18), t[:10], fill="black", font=_font(11))
    for k, (row, m) in enumerate(zip(a, _answered(results))):
        d.text((10, top + k * cell + cell // 2 - 7), "base" if k == 0 else f"after {k}", fill="black", font=_font(12))
        for j, v in enumerate(row):
            if v is None:  # blank where the task was not answered (metrics.tasks_answered_per_row), else "n/a"
                if j < m:
                    d.text((left + j * cell + 10, top + k * cell + cell // 2 - 7), "n/a", fill="black", font=_font(13))
                continue
            x, y, f = left + j * cell, top + k * cell, max(0.0, min(1.0, v / 100))
            colour = (int(255 - 200 * f), int(255 - 90 * f), int(255 - 40 * f))  # white -> blue
            d.rectangle((x, y, x + cell - 2, y + cell - 2), fill=colour)
            d.text((x + 10, y + cell // 2 - 7), f"{v:.0f}", fill="black" if f < 0.6 else "white", font=_font(13))
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def curves(results: dict, path: Path) -> None:
    a, tasks = results["acc_matrix"], results["tasks"]
    W, H, L, B, T, R = 720, 420, 60, 50, 40, 150
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.text((L, 10), f"{results['method']}: each task's score across stages", fill="black", font=_font(16))
    x = lambda k: L + (W - L - R) * k / max(1, len(a) - 1)  # noqa: E731
    y = lambda v: H - B - (H - B - T) * v / 100  # noqa: E731
    for v in range(0, 101, 25):
        d.line((L, y(v), W - R, y(v)), fill=(225, 225, 225))
        d.text((L - 30, y(v) - 7), str(v), fill="black", font=_font(11))
    for k in range(len(a)):
        d.text((x(k) - 10, H - B + 8), "base" if k == 0 else str(k), fill="black", font=_font(11))
    for j, t in enumerate(tasks):
        c = PALETTE[j % len(PALETTE)]
        pts = [(x(k), y(a[k][j])) for k in range(len(a)) if a[k][j] is not None]
        if len(pts) > 1:
            d.line(pts, fill=c, width=2)
        for px, py in pts:
            d.ellipse((px - 3, py - 3, px + 3, py + 3), fill=c)
        d.line((W - R + 15, T + 18 * j + 7, W - R + 35, T + 18 * j + 7), fill=c, width=3)
        d.text((W - R + 40, T + 18 * j), t, fill="black", font=_font(12))
    d.text((L + (W - L - R) // 2 - 30, H - 22), "stage (tasks trained)", fill="black", font=_font(12))
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def loss_curves(results: dict, path: Path) -> None:
    """Every stage's L_task against the run's steps, in its colour, and the method's own terms
    (lambda L_align, L_reg, ...) in grey where there are any; a grey line where a stage begins.
    Points are [step, L_task, the method's terms] ([step, loss] in runs made before the split)."""
    curves = results.get("loss_curves") or []
    W, H, L, B, T, R = 720, 360, 60, 50, 40, 20
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.text((L, 10), f"{results['method']}: L_task per stage (grey: the method's own terms)", fill="black",
           font=_font(16))
    points, offset = [], 0  # per stage: (step, L_task, method terms)
    for curve in curves:
        points.append([(offset + p[0], p[1], p[2] if len(p) > 2 else 0.0) for p in curve])
        offset += curve[-1][0] if curve else 0
    losses = [v for pts in points for _, *vs in pts for v in vs if v == v]  # NaN-free
    if not losses:
        atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))
        return
    top, total = max(losses) * 1.05 or 1.0, max(offset, 1)
    x = lambda s: L + (W - L - R) * s / total  # noqa: E731
    y = lambda v: H - B - (H - B - T) * v / top  # noqa: E731
    for frac in (0, 0.25, 0.5, 0.75, 1):
        d.line((L, y(top * frac), W - R, y(top * frac)), fill=(225, 225, 225))
        d.text((5, y(top * frac) - 7), f"{top * frac:.2f}", fill="black", font=_font(11))
    for s, pts in enumerate(points):
        if pts:
            start = pts[0][0] - curves[s][0][0]
            d.line((x(start), T, x(start), H - B), fill=(200, 200, 200))
            d.text((x(start) + 2, H - B + 8), str(s + 1), fill="black", font=_font(11))
        for k, colour, width in ((2, (150, 150, 150), 1), (1, PALETTE[s % len(PALETTE)], 2)):
            ok = [(x(p[0]), y(p[k])) for p in pts if p[k] == p[k]]
            if len(ok) > 1 and any(p[k] for p in pts):
                d.line(ok, fill=colour, width=width)
    d.text((L + (W - L - R) // 2 - 40, H - 22), "step (stage numbers below)", fill="black", font=_font(12))
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def scatter(points: list, path: Path, title: str, xlabel: str, ylabel: str) -> None:
    """Labelled points (label, x > 0, y in 0..100, y error or None) on a log-x axis, error bars where given."""
    W, H, L, B, T, R = 760, 460, 60, 50, 40, 30
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.text((L, 10), title, fill="black", font=_font(16))
    lo = math.floor(math.log10(min(p[1] for p in points)))
    hi = math.ceil(math.log10(max(p[1] for p in points)))
    hi = hi if hi > lo else lo + 1
    x = lambda v: L + (W - L - R) * (math.log10(v) - lo) / (hi - lo)  # noqa: E731
    y = lambda v: H - B - (H - B - T) * v / 100  # noqa: E731
    for v in range(0, 101, 25):
        d.line((L, y(v), W - R, y(v)), fill=(225, 225, 225))
        d.text((L - 30, y(v) - 7), str(v), fill="black", font=_font(11))
    for e in range(lo, hi + 1):
        d.line((x(10 ** e), T, x(10 ** e), H - B), fill=(225, 225, 225))
        d.text((x(10 ** e) - 12, H - B + 8), f"1e{e}", fill="black", font=_font(11))
    placed = []  # label corners so far: methods at one size share an x, and their labels must not overprint
    for j, (label, px, py, err) in sorted(enumerate(points), key=lambda p: -p[1][2]):
        c = PALETTE[j % len(PALETTE)]
        if err:
            d.line((x(px), y(py - err), x(px), y(py + err)), fill=c, width=2)
        d.ellipse((x(px) - 4, y(py) - 4, x(px) + 4, y(py) + 4), fill=c)
        lx, ly = x(px) + 6, y(py) - 14
        while any(abs(lx - ox) < 70 and abs(ly - oy) < 14 for ox, oy in placed):
            ly += 14
        placed.append((lx, ly))
        d.text((lx, ly), label, fill=c, font=_font(12))
    d.text((L + (W - L - R) // 2 - 60, H - 22), xlabel, fill="black", font=_font(12))
    d.text((5, T - 20), ylabel, fill="black", font=_font(12))
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def write_report(results: dict, out: Path) -> str:
    table = text_table(results)
    atomic_write(out / "results.txt", lambda tmp: Path(tmp).write_text(table + "\n"))
    heatmap(results, out / "acc_matrix.png")
    curves(results, out / "task_curves.png")
    loss_curves(results, out / "loss_curves.png")
    return table
