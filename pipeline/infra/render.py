"""HTML and Markdown output shared by the report and the config comparison.

Two levels: functions for the pieces (tables, lists, inline text, embedded images, the page
shell with its style), and a small document model (`Section`s of blocks) for pages whose HTML and
Markdown show the same content, so each section is described once and rendered to both. HTML
pages are self-contained: images are embedded as data: URIs and nothing is fetched.

Text written for both formats uses Markdown's inline syntax, of which HTML renders `code` and
**strong**; table cells are data, escaped in both formats.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

STYLE = """body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}
table{border-collapse:collapse;margin:1rem 0}td,th{border:1px solid #ccc;padding:.25rem .6rem;
text-align:right}img{max-width:100%}pre{background:#f4f4f4;padding:1rem;overflow:auto}
.big{font-size:1.6rem;font-weight:600}"""
_INLINE = re.compile(r"`([^`]+)`|\*\*([^*]+)\*\*")


def inline_html(text: str) -> str:
    """`text` (Markdown inline syntax) as HTML: escaped, with `code` and **strong** rendered."""

    def tag(match: re.Match[str]) -> str:
        code, strong = match.groups()
        return f"<code>{code}</code>" if code is not None else f"<strong>{strong}</strong>"

    return _INLINE.sub(tag, html.escape(text))


def html_table(
    header: Sequence[object], rows: Iterable[Sequence[object]], row_classes: Sequence[str] = ()
) -> str:
    """A <table> of str(cell)s, escaped; row_classes[i] (if given and not "") is row i's class."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        css = row_classes[i] if i < len(row_classes) else ""
        cells = "".join(f"<td>{html.escape(str(c))}</td>" for c in row)
        body.append(f'<tr class="{css}">{cells}</tr>' if css else f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _cell(value: object) -> str:
    return str(value).replace("|", "\\|")  # a bare | would end the cell


def markdown_table(header: Sequence[object], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub-flavoured Markdown table of str(cell)s, with | escaped; no trailing newline."""
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def html_list(items: Iterable[str]) -> str:
    """A <ul> of `items` (Markdown inline syntax)."""
    return "<ul>" + "".join(f"<li>{inline_html(item)}</li>" for item in items) + "</ul>"


def markdown_list(items: Iterable[str]) -> str:
    return "\n".join(f"- {item}" for item in items)


def image(path: Path, alt: str) -> str:
    """An <img> with the PNG at `path` embedded as a base64 data: URI."""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def page(title: str, parts: Iterable[str], extra_style: str = "") -> str:
    """A complete HTML page: the shared STYLE (then `extra_style`, which overrides it) and
    `parts`, one per line."""
    head = (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{STYLE}{extra_style}</style></head><body>"
    )
    return "\n".join([head, *parts, "</body></html>"]) + "\n"


# --------------------------------------------------------------------------- document model


class Block(Protocol):
    def html(self) -> str: ...

    def markdown(self) -> str | None:
        """The block in Markdown; None when it has none (an image)."""
        ...


@dataclass(frozen=True)
class Text:
    """A paragraph in Markdown inline syntax; `css` is its HTML class."""

    text: str
    css: str = ""

    def html(self) -> str:
        opening = f'<p class="{self.css}">' if self.css else "<p>"
        return opening + inline_html(self.text) + "</p>"

    def markdown(self) -> str:
        return self.text


@dataclass(frozen=True)
class Headline:
    """A page's key figures, e.g. ["test accuracy 0.98", "loss 0.07"]: one large line in HTML;
    in Markdown the first in bold (capitalized, it starts the sentence), the rest after commas."""

    figures: Sequence[str]

    def html(self) -> str:
        return '<p class="big">' + html.escape(" · ".join(self.figures)) + "</p>"

    def markdown(self) -> str:
        first, *rest = self.figures
        return "".join([f"**{first[:1].upper()}{first[1:]}**", *(f", {f}" for f in rest)])


@dataclass(frozen=True)
class Table:
    header: Sequence[object]
    rows: Sequence[Sequence[object]]

    def html(self) -> str:
        return html_table(self.header, self.rows)

    def markdown(self) -> str:
        return markdown_table(self.header, self.rows)


@dataclass(frozen=True)
class Image:
    """A PNG figure: embedded in HTML, left out of Markdown (which stays a text summary)."""

    path: Path
    alt: str

    def html(self) -> str:
        return image(self.path, self.alt)

    def markdown(self) -> None:
        return None


@dataclass(frozen=True)
class Code:
    """Preformatted text (a config listing): <pre> in HTML, a fenced block in Markdown."""

    text: str
    language: str = ""

    def html(self) -> str:
        return f"<pre>{html.escape(self.text)}</pre>"

    def markdown(self) -> str:
        return f"```{self.language}\n{self.text.rstrip()}\n```"


@dataclass(frozen=True)
class Section:
    """An <h2>/## section (no heading when `heading` is ""), shown in the formats flagged."""

    heading: str
    blocks: Sequence[Block]
    in_html: bool = True
    in_markdown: bool = True


def document(title: str, sections: Iterable[Section], extra_style: str = "") -> tuple[str, str]:
    """(HTML page, Markdown text) of `sections` under the <h1>/# `title`."""
    parts, paragraphs = [f"<h1>{html.escape(title)}</h1>"], [f"# {title}"]
    for section in sections:
        if section.in_html:
            if section.heading:
                parts.append(f"<h2>{html.escape(section.heading)}</h2>")
            parts += [block.html() for block in section.blocks]
        if section.in_markdown:
            if section.heading:
                paragraphs.append(f"## {section.heading}")
            paragraphs += [md for block in section.blocks if (md := block.markdown()) is not None]
    return page(title, parts, extra_style), "\n\n".join(paragraphs) + "\n"
