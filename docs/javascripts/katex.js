// Typeset the docs' math with the KaTeX copy in assets/katex (no CDN: the site works offline).
// Markdown pages: pymdownx.arithmatex (generic mode) leaves \( \) and \[ \] in the text.
// Tutorials: the notebooks' markdown cells (.jp-RenderedMarkdown) write $...$ and $$...$$.
(function () {
  const tex = [
    { left: "\\[", right: "\\]", display: true },
    { left: "\\(", right: "\\)", display: false },
  ];
  const dollars = [{ left: "$$", right: "$$", display: true }, { left: "$", right: "$", display: false }];

  function typeset(root) {
    // The whole page, not only .arithmatex: the table of contents repeats headings' math as text.
    renderMathInElement(root, { delimiters: tex, throwOnError: false });
    if (!root.querySelector(".jp-Notebook")) return;
    // Notebook pages: their markdown cells and the table of contents made from their headings.
    for (const el of root.querySelectorAll(".jp-RenderedMarkdown, .md-nav")) {
      renderMathInElement(el, { delimiters: [...dollars, ...tex], throwOnError: false });
    }
  }

  if (typeof document$ !== "undefined") {
    document$.subscribe(({ body }) => typeset(body)); // mkdocs-material: every page load
  } else {
    document.addEventListener("DOMContentLoaded", () => typeset(document.body));
  }
})();
