"""The PDF result of a study (``GET /studies/{uid}/report.pdf``): the images and heatmaps, every model's
findings with probability, threshold, name and version, the gate's reason where an image was not assessable,
the radiologist's decision when there is one, and the research-use notice.

Rendered from a Jinja2 template (autoescaping on) by WeasyPrint. Images come inline as ``data:`` URIs, and
the URL fetcher allows nothing else: a value in the study that looks like a URL can make WeasyPrint fetch
neither a network address nor a local file.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape

from core.domain import DECISION_SUPPORT_NOTICE

_TEMPLATES = Path(__file__).parent / "templates"
_env = Environment(loader=FileSystemLoader(_TEMPLATES), autoescape=select_autoescape(["html"]))


def data_uri(data: bytes, media_type: str) -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode('ascii')}"


def render_html(context: dict[str, Any]) -> str:
    return _env.get_template("report.html").render(notice=DECISION_SUPPORT_NOTICE, **context)


def render_pdf(context: dict[str, Any]) -> bytes:
    """The report as PDF bytes; ``context`` as report.html reads it (see api.routes.report)."""
    from weasyprint import HTML
    from weasyprint.urls import URLFetcher

    fetcher = URLFetcher(allowed_protocols=("data",), allow_redirects=False, timeout=1)
    pdf: bytes = HTML(string=render_html(context), url_fetcher=fetcher).write_pdf()
    return pdf
