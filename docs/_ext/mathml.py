"""Math as MathML, written at build time: formulas render offline, with no script and no font.

Sphinx's default math renderer loads MathJax from a CDN, so without internet every formula
shows as raw LaTeX. This renderer converts each ``:math:`` role and ``.. math::`` block to
MathML with ``latex2mathml`` while the HTML is written; every current browser draws MathML
itself. A formula that cannot be converted stops the build with its source location, and when an
HTML build finishes every page is checked: no script or stylesheet from another host, no
TeX delimiter left unconverted. So a green ``sphinx -W`` build means the site shows every
formula offline.

Enable with ``extensions = ["mathml"]`` (``docs/_ext`` on ``sys.path``) and
``html_math_renderer = "mathml"``.
"""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Any

from docutils import nodes
from latex2mathml.converter import convert
from sphinx.application import Sphinx
from sphinx.errors import ExtensionError
from sphinx.writers.html5 import HTML5Translator


def to_mathml(latex: str, node: nodes.Element, display: str) -> str:
    """One formula as a ``<math>`` element; a conversion failure names the formula's source."""
    try:
        markup = convert(latex.strip(), display=display)
    except Exception as error:  # latex2mathml raises several types for unsupported input
        source, line = node.source or "?", node.line or "?"
        raise ExtensionError(f"{source}:{line}: cannot convert this formula to MathML ({error}): {latex!r}") from error
    # the LaTeX source, for copying and for screen readers that prefer it
    return markup.replace("<math ", f'<math alttext="{html.escape(latex.strip(), quote=True)}" ', 1)


def visit_math(self: HTML5Translator, node: nodes.math) -> None:
    self.body.append(f'<span class="math notranslate">{to_mathml(node.astext(), node, "inline")}</span>')
    raise nodes.SkipNode


def visit_displaymath(self: HTML5Translator, node: nodes.math_block) -> None:
    parts = [node.astext()] if node.get("nowrap") else [p for p in node.astext().split("\n\n") if p.strip()]
    self.body.append(self.starttag(node, "div", CLASS="math notranslate"))
    if node.get("number"):  # a labelled equation: its number, as Sphinx's other renderers show it
        self.body.append(f'<span class="eqno">({node["number"]})</span>')
    for part in parts:
        self.body.append(to_mathml(part, node, "block"))
    self.body.append("</div>\n")
    raise nodes.SkipNode


# a script or stylesheet loaded from another host, TeX that a math renderer left in the text,
# and a TeX command that the converter did not know and copied into the MathML as it was
# (latex2mathml writes ``\arg`` as ``<mi>\arg</mi>``: the page would show the backslash)
_REMOTE = re.compile(r"<(?:script[^>]*\ssrc|link[^>]*\shref)=[\"'](?:https?:)?//", re.IGNORECASE)
_TEX = re.compile(r"\\\(|\\\)|\\\[|\\\]|\$\$")
_RAW_COMMAND = re.compile(r"<m[ion][^>]*>\\[A-Za-z]+</m[ion]>")
# the site gives no e-mail address: a mailto link is text such as "R@10" that docutils took for one
_MAILTO = re.compile(r'href="mailto:[^"]*"')


def offline_problems(page: str) -> list[str]:
    """What in one built HTML page would need a network, or shows raw TeX."""
    problems = [f"loads {m.group(0)!r}" for m in _REMOTE.finditer(page)]
    text = re.sub(r'alttext="[^"]*"', "", page)  # the LaTeX kept beside each formula is not shown
    text = re.sub(r"<(pre|script|style)\b.*?</\1>", "", text, flags=re.DOTALL | re.IGNORECASE)
    problems += [f"raw TeX {m.group(0)!r}" for m in _TEX.finditer(text)]
    problems += [f"a TeX command the converter did not know, {m.group(0)!r}" for m in _RAW_COMMAND.finditer(text)]
    problems += [
        f"text taken for an e-mail address (escape its @ as \\@), {m.group(0)!r}" for m in _MAILTO.finditer(text)
    ]
    return problems


def check_offline(app: Sphinx, exception: Exception | None) -> None:
    if exception is not None or app.builder.format != "html":
        return
    found = []
    for path in sorted(Path(app.outdir).rglob("*.html")):
        for problem in offline_problems(path.read_text(encoding="utf-8")):
            found.append(f"{path.relative_to(app.outdir)}: {problem}")
    if found:
        raise ExtensionError("the built site is not self-contained:\n  " + "\n  ".join(found[:20]))


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_html_math_renderer("mathml", (visit_math, None), (visit_displaymath, None))
    app.connect("build-finished", check_offline)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
