"""The table of every site's and the global model's validation scores after federated training.

NVFlare's cross-site evaluation sends each model (each site's best local model and the server's
global model) to every site, which validates it on its own validation split. :class:`SiteScoresWriter`
collects those results on the server and, when the run ends, writes them as ``site_scores.json`` and
``site_scores.md`` beside the global model: one row per model, one column per site and metric.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from nvflare.apis.dxo import DataKind, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.widgets.widget import Widget

from common.io.atomic import atomic_write
from common.utils import nan_to_none

__all__ = ["SiteScoresWriter", "scores_markdown", "write_scores"]

# CrossSiteModelEval names the server's models "SRV_<locator name>"
SERVER_PREFIX = "SRV_"

Scores = Mapping[str, Mapping[str, Mapping[str, float]]]


def _model_label(owner: str) -> str:
    return (
        f"{owner[len(SERVER_PREFIX) :]} (server)" if owner.startswith(SERVER_PREFIX) else f"{owner} (local)"
    )


def scores_markdown(scores: Scores) -> str:
    """Markdown table of ``scores[model][site][metric]``: server models first, then each site's own."""
    models = sorted(scores, key=lambda owner: (not owner.startswith(SERVER_PREFIX), owner))
    sites = sorted({site for by_site in scores.values() for site in by_site})
    metrics = sorted({name for by_site in scores.values() for values in by_site.values() for name in values})
    columns = [(site, metric) for site in sites for metric in metrics]
    lines = [
        "| model | " + " | ".join(f"{site} {metric}" for site, metric in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for owner in models:
        cells = []
        for site, metric in columns:
            value = scores[owner].get(site, {}).get(metric)
            cells.append("-" if value is None else f"{value:.4f}")
        lines.append(f"| {_model_label(owner)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_scores(scores: Scores, output_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``site_scores.json`` (``{model: {site: {metric: value}}}``) and ``site_scores.md`` atomically."""
    output_dir = Path(output_dir)
    text = json.dumps(nan_to_none(scores), indent=2, sort_keys=True) + "\n"
    json_path = atomic_write(output_dir / "site_scores.json", lambda f: f.write(text.encode()))
    table = scores_markdown(scores)
    md_path = atomic_write(output_dir / "site_scores.md", lambda f: f.write(table.encode()))
    return json_path, md_path


class SiteScoresWriter(Widget):
    """Collect cross-site validation results on the server and write the scores table at the end of the run.

    Args:
        output_dir: folder of the table, relative to the server's app folder (put it in the bundle
            folder so that it travels with the global model).
    """

    def __init__(self, output_dir: str) -> None:
        super().__init__()
        self.output_dir = output_dir
        self.scores: dict[str, dict[str, dict[str, float]]] = {}

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type == EventType.START_RUN:
            self.scores.clear()
        elif event_type == AppEventType.VALIDATION_RESULT_RECEIVED:
            self._collect(fl_ctx)
        elif event_type == EventType.END_RUN and self.scores:
            paths = write_scores(self.scores, Path(fl_ctx.get_prop(FLContextKey.APP_ROOT)) / self.output_dir)
            self.log_info(fl_ctx, f"wrote the site scores to {paths[1]}")

    def _collect(self, fl_ctx: FLContext) -> None:
        owner = fl_ctx.get_prop(AppConstants.MODEL_OWNER)
        site = fl_ctx.get_prop(AppConstants.DATA_CLIENT)
        result = fl_ctx.get_prop(AppConstants.VALIDATION_RESULT)
        if not owner or not site or result is None:
            self.log_error(
                fl_ctx, f"incomplete validation result (model {owner!r}, site {site!r}): not in the table"
            )
            return
        dxo = from_shareable(result)
        if dxo.data_kind != DataKind.METRICS:
            self.log_error(fl_ctx, f"validation result of {site} is {dxo.data_kind}, expected METRICS")
            return
        self.scores.setdefault(owner, {})[site] = {name: float(value) for name, value in dxo.data.items()}
