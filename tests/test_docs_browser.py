"""The docs site works offline in a real browser: built with ``mkdocs build --strict``, served
from 127.0.0.1 by ``python -m http.server`` and opened in headless Chromium whose name lookups all
fail except 127.0.0.1 (the network is off for it), the math is typeset by the vendored KaTeX
(no raw ``\\(`` left), every image loads, every internal link and asset exists, and nothing is
loaded from another host.

Needs Chromium (``make test`` installs it on CI as root); elsewhere the test is skipped, or
deselect it with ``-m "not browser"``.
"""

import base64
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # the network is off: every host name but the local server's fails to resolve
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    "--virtual-time-budget=5000",  # let the page's scripts (KaTeX) finish before the dump
)
# Text of these elements is not prose: KaTeX keeps the TeX source in <annotation>.
NOT_PROSE = {"script", "style", "pre", "code", "annotation", "textarea", "noscript"}

pytestmark = pytest.mark.browser

for module in ("mkdocs", "material", "mkdocstrings", "mkdocs_jupyter"):
    pytest.importorskip(module)


def chromium() -> str:
    found = os.environ.get("CHROMIUM") or next(
        (p for p in map(shutil.which, CHROMIUM_NAMES) if p), None
    )
    if found is None:
        why = "Chromium not found (apt-get install chromium; `make test` does it as root)"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    return found


class Page(HTMLParser):
    """Links, images, ids and prose text of one HTML document."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.refs: list[tuple[str, str, str]] = []  # (tag, attribute, url)
        self.imgs: list[str] = []
        self.ids: set[str] = set()
        self.classes: list[str] = []
        self.text: list[str] = []
        self._skip: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        for key in ("id", "name"):
            if a.get(key):
                self.ids.add(a[key])
        self.classes.extend(a.get("class", "").split())
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        for attr in ("href", "src"):
            if attr in a and tag in ("a", "link", "script", "img", "iframe", "source"):
                rel = a.get("rel", "")
                if tag == "link" and rel in ("canonical", "preconnect", "dns-prefetch"):
                    continue  # not loaded
                self.refs.append((tag, attr, a[attr]))
        if tag in NOT_PROSE:
            self._skip.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if self._skip and self._skip[-1] == tag:
            self._skip.pop()

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.text.append(data)


def parse(html: str) -> Page:
    page = Page()
    page.feed(html)
    page.close()
    return page


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    site = tmp_path_factory.mktemp("docs") / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    return site


@pytest.fixture(scope="module")
def server(site):
    """``python -m http.server`` on a free port of 127.0.0.1, serving the built site."""
    cmd = [sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1"]
    proc = subprocess.Popen(
        [*cmd, "--directory", str(site)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "Serving HTTP on 127.0.0.1 port N (http://...) ..."
        port = re.search(r"port (\d+)", line)
        assert port, line
        yield f"http://127.0.0.1:{port.group(1)}/"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def page_url(base: str, site: Path, html: Path) -> str:
    rel = html.relative_to(site).as_posix()
    return urljoin(base, rel[: -len("index.html")] if rel.endswith("index.html") else rel)


def target(site: Path, url: str) -> Path:
    """The file under ``site`` that a same-site URL is served from."""
    path = site / unquote(urlsplit(url).path).lstrip("/")
    return path / "index.html" if path.is_dir() else path


def dump_dom(browser: str, url: str) -> str:
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run(
            [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", url],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert proc.returncode == 0 and "</html>" in proc.stdout, (url, proc.stderr[-3000:])
    return proc.stdout


def math_pages(site: Path) -> list[Path]:
    """Pages with math: arithmatex spans (Markdown) or $...$ in notebook markdown cells."""
    pages = []
    for html in sorted(site.rglob("*.html")):
        text = html.read_text()
        if 'class="arithmatex"' in text or re.search(r"jp-RenderedMarkdown[\s\S]*\$\\", text):
            pages.append(html)
    return pages


def test_site_offline_in_chromium(site, server):
    browser = chromium()
    pages = math_pages(site)
    names = {p.relative_to(site).as_posix() for p in pages}
    assert {"concepts.html", "tutorials/01_quickstart.html"} <= names, names
    with_imgs = [p for p in site.rglob("*.html") if "<img" in p.read_text() and p not in pages]
    for html in pages + with_imgs:
        url = page_url(server, site, html)
        dom = parse(dump_dom(browser, url))
        text = "".join(dom.text)
        if html in pages:
            n_math = html.read_text().count('class="arithmatex"')
            assert dom.classes.count("katex") >= max(n_math, 1), (url, "math not typeset")
            assert "katex-error" not in dom.classes, url
            for raw in ("\\(", "\\[", "$\\"):
                assert raw not in text, (url, raw, text[text.find(raw) - 80 :][:160])
        for src in dom.imgs:
            if src.startswith("data:image/"):
                assert base64.b64decode(src.split(",", 1)[1], validate=True), url
                continue
            full = urljoin(url, src)
            assert full.startswith(server), (url, src, "image from another host")
            assert target(site, full).is_file(), (url, src)
            with urllib.request.urlopen(full, timeout=10) as resp:
                assert resp.status == 200 and resp.headers["Content-Type"].startswith("image/")


def test_site_works_opened_from_disk(site):
    """Issue 27 item 7: ``site/index.html`` opened as a file (no server) links every page as a
    file, not a directory (``use_directory_urls: false``): following each nav link from it
    gives a page file; a few of them, opened, are rendered, math typeset by the vendored KaTeX."""
    browser = chromium()
    home = (site / "index.html").as_uri()
    dom = parse(dump_dom(browser, home))
    links = {
        urljoin(home, url).split("#")[0]
        for tag, _attr, url in dom.refs
        if tag == "a" and not urlsplit(url).scheme and urlsplit(url).path
    }
    pages = sorted(u for u in links if u.endswith(".html"))
    assert len(pages) >= 20 and not sorted(links - set(pages)), sorted(links - set(pages))
    for url in pages:
        assert Path(unquote(urlsplit(url).path)).is_file(), url
    opened = ("/concepts.html", "/tutorials/01_quickstart.html", "/api/index.html")
    for url in [u for u in pages if u.endswith(opened)]:
        page = parse(dump_dom(browser, url))
        assert "md-content" in page.classes, (url, "not a rendered page")
        if url.endswith(("/concepts.html", "/01_quickstart.html")):
            assert "katex" in page.classes and "katex-error" not in page.classes, url


def test_site_links_and_assets_are_local(site):
    """Every relative link, script, stylesheet and image of every page exists in the site; no
    page loads anything from another host; the anchors of internal links exist."""
    ids: dict[Path, set[str]] = {}
    refs: list[tuple[Path, str, str, str]] = []
    for html in site.rglob("*.html"):
        page = parse(html.read_text())
        ids[html] = page.ids
        refs += [(html, tag, attr, url) for tag, attr, url in page.refs]
    assert len(ids) > 20 and len(refs) > 500
    broken, remote, anchors = [], [], []
    for html, tag, _attr, url in refs:
        parts = urlsplit(url)
        if parts.scheme in ("data", "mailto"):
            continue
        if parts.scheme or url.startswith("//"):
            if tag != "a":  # a script, stylesheet, image or frame from another host
                remote.append((html.relative_to(site).as_posix(), url))
            continue
        if not parts.path:
            dest = html
        else:
            dest = target(site, urljoin(f"http://site/{html.relative_to(site).as_posix()}", url))
            if not dest.is_file():
                broken.append((html.relative_to(site).as_posix(), url))
                continue
        fragment = unquote(parts.fragment)
        if fragment and dest.suffix == ".html" and fragment not in ids.get(dest, {fragment}):
            anchors.append((html.relative_to(site).as_posix(), url))
    assert not remote, remote[:20]
    assert not broken, broken[:20]
    assert not anchors, anchors[:20]
    for css in site.rglob("*.css"):
        for url in re.findall(r"url\(\s*['\"]?([^'\")]+)", css.read_text()):
            if url.startswith("data:"):
                continue
            assert not urlsplit(url).scheme, (css, url)
            assert (css.parent / urlsplit(url).path).is_file(), (css, url)
