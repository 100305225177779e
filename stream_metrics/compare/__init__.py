"""Compare runs by the data they have seen: read what MLflow and W&B stored, line the runs up on a
progress axis, and write a table at equal amounts of data, a PNG and a self-contained HTML page.

    from stream_metrics import compare as sm_compare

    runs = sm_compare.read_runs(["bs8", "bs32", "wandb/offline-run-20260101_120000-abc123"],
                                mlflow_uri="sqlite:///mlflow.db")
    result = sm_compare.compare(runs, metrics=["train/loss"], axis="samples", at=[10_000])
    print(sm_compare.table_text(result))
    sm_compare.write_html(result, "compare.html")

readers.py reads the stores, align.py lines the runs up, render.py writes tables and pictures
(the HTML page is page.html). The command line (cli.py) is a thin layer over these functions.
"""
from .align import DEFAULT_METRIC, Comparison, Line, amounts_on, compare, interpolate, smoothed
from .readers import (CompareError, RunHistory, default_mlflow_uri, mlflow_store, read_runs, read_wandb_run,
                      wandb_files, wandb_records)
from .render import (PLOT_INSTALL, describe, html_data, number, read_html_data, table_markdown, table_text, write_csv,
                     write_html, write_png)

__all__ = ["DEFAULT_METRIC", "PLOT_INSTALL", "CompareError", "Comparison", "Line", "RunHistory", "amounts_on",
           "compare", "default_mlflow_uri", "describe", "html_data", "interpolate", "mlflow_store", "number",
           "read_html_data", "read_runs", "read_wandb_run", "smoothed", "table_markdown", "table_text", "wandb_files",
           "wandb_records", "write_csv", "write_html", "write_png"]
