"""The training report: curves and histograms as PNG, and a markdown summary linking them."""

from __future__ import annotations

import io

import numpy as np

from rtml import metrics

FIGURES = {
    "roc.png": "ROC curve (validation)",
    "precision_recall.png": "Precision-recall curve (validation)",
    "score_histogram.png": "Scores by label (validation)",
    "loss.png": "Loss by epoch",
}


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def figures(labels: np.ndarray, scores: np.ndarray, history: dict, thresholds) -> dict[str, bytes]:
    """The report's PNG files by name."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    out = {}
    fpr, tpr, _ = metrics.roc_curve(labels, scores)
    fig = Figure(figsize=(5, 5))
    ax = fig.subplots()
    ax.plot(fpr, tpr, label=f"model (AUC {metrics.auc_roc(labels, scores):.3f})")
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey", label="chance")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=FIGURES["roc.png"])
    ax.legend(loc="lower right")
    out["roc.png"] = _png(fig)

    precision, recall, _ = metrics.precision_recall_curve(labels, scores)
    fig = Figure(figsize=(5, 5))
    ax = fig.subplots()
    ax.plot(recall, precision, label=f"model (AP {metrics.average_precision(labels, scores):.3f})")
    ax.axhline(float(labels.mean()), linestyle=":", color="grey", label="fraud rate")
    ax.set(xlabel="recall", ylabel="precision", title=FIGURES["precision_recall.png"], ylim=(0, 1.02))
    ax.legend(loc="upper right")
    out["precision_recall.png"] = _png(fig)

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    bins = np.linspace(0.0, 1.0, 51)
    ax.hist(scores[labels < 0.5], bins=bins, alpha=0.6, density=True, label="genuine", log=True)
    ax.hist(scores[labels > 0.5], bins=bins, alpha=0.6, density=True, label="fraud", log=True)
    for name, value in (("review", thresholds.review), ("decline", thresholds.decline)):
        ax.axvline(value, linestyle="--", color="black" if name == "decline" else "grey", label=name)
    ax.set(xlabel="score", ylabel="density (log)", title=FIGURES["score_histogram.png"])
    ax.legend()
    out["score_histogram.png"] = _png(fig)

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    epochs = np.arange(1, len(history["loss"]) + 1)
    ax.plot(epochs, history["loss"], marker="o", label="training")
    ax.plot(epochs, history["val_loss"], marker="o", label="validation")
    ax.axvline(history["best_epoch"], linestyle=":", color="grey", label="kept")
    ax.set(xlabel="epoch", ylabel="weighted cross-entropy", title=FIGURES["loss.png"])
    ax.legend()
    out["loss.png"] = _png(fig)
    return out


def summary_markdown(metadata: dict) -> str:
    """A short markdown summary of a version, linking the figures."""
    window = metadata["training_window"]
    validation = metadata["validation_metrics"]
    thresholds = metadata["thresholds"]
    lines = [
        f"# Model {metadata['version']}",
        "",
        f"{metadata['model']['kind']} trained on {window['start']} .. {window['end']} "
        f"(validation from {window['validation_start']}), created {metadata['created_at']}.",
        "",
        "| | training | validation |",
        "| --- | --- | --- |",
        f"| transactions | {metadata['examples']['train']} | {metadata['examples']['validation']} |",
        f"| frauds | {metadata['examples']['train_positives']} | {metadata['examples']['validation_positives']} |",
        "",
        "| validation metric | value |",
        "| --- | --- |",
        f"| AUC ROC | {validation['auc_roc']:.4f} |",
        f"| average precision | {validation['average_precision']:.4f} |",
        f"| card precision@100 | {validation['card_precision_at_100']:.4f} |",
        f"| review: threshold / alert rate / precision / recall | {thresholds['review']:.4f} / "
        f"{validation['review']['alert_rate']:.2%} / {validation['review']['precision']:.2%} / {validation['review']['recall']:.2%} |",
        f"| decline: threshold / alert rate / precision / recall | {thresholds['decline']:.4f} / "
        f"{validation['decline']['alert_rate']:.2%} / {validation['decline']['precision']:.2%} / {validation['decline']['recall']:.2%} |",
        "",
        f"Thresholds: {thresholds['method']}.",
        "",
    ]
    for name, title in FIGURES.items():
        lines += [f"## {title}", "", f"![{title}]({name})", ""]
    return "\n".join(lines)
