"""Open an HTML file in headless Chromium and read back what rendered (images, tables).

A copy of the page with a small script is written beside it (so relative image paths resolve);
the script records each image's naturalWidth and each table's size into the DOM after `load`,
and `chromium --dump-dom` returns that DOM.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"

_PROBE = """<script>
window.addEventListener('load', () => {
  const images = [...document.images].map(i => ({src: i.getAttribute('src'), width: i.naturalWidth,
                                                 shown: i.getBoundingClientRect().width}));
  const tables = [...document.querySelectorAll('table')].map(t => ({id: t.id, rows: t.rows.length,
                                                                     height: t.getBoundingClientRect().height}));
  const out = document.createElement('pre');
  out.id = 'render-probe';
  out.textContent = JSON.stringify({images, tables});
  document.body.appendChild(out);
});
</script>"""


def render(page: Path, timeout: float = 120) -> dict:
    """{"images": [{src, width, shown}], "tables": [{id, rows, height}]} as Chromium rendered `page`."""
    probe_page = page.with_name(f".render-probe-{page.name}")
    probe_page.write_text(page.read_text().replace("</body>", _PROBE + "</body>"))
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    try:
        proc = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-dev-shm-usage",
             f"--user-data-dir={profile}", "--virtual-time-budget=15000", "--dump-dom",
             probe_page.resolve().as_uri()],
            capture_output=True, text=True, timeout=timeout,
        )
    finally:
        probe_page.unlink(missing_ok=True)
        shutil.rmtree(profile, ignore_errors=True)
    found = re.search(r'<pre id="render-probe">(.*?)</pre>', proc.stdout, re.S)
    if not found:
        raise RuntimeError(f"chromium rendered no probe (rc {proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(html.unescape(found.group(1)))
