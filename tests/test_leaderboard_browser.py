"""The leaderboard page renders in a real browser: headless Chromium takes a screenshot of it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from sleeptrain_assets.lib import leaderboard_report as lr
from tests.test_leaderboard_report import make_run

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
WIDTH, HEIGHT = 1280, 2400


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium); .ci/run installs it")
def test_leaderboard_renders_in_headless_chromium(tmp_path: Path):
    older = make_run("v0001-aaa", "2026-01-01T10:00:00+00:00", adapter={"recall": 0.7, "paraphrase": 0.5})
    run = make_run("v0002-abc", history={"cycles": [{"cycle": 1, "adapter_version": "v0001-aaa", "time": "t",
                                                     "facts": {"lena_varga/birth.year": 1.0}, "kinds": {}}]})
    rows = lr.merge_rows(lr.rows_from_run(older), lr.rows_from_run(run))
    page = tmp_path / "leaderboard.html"
    lr.write_text_atomic(page, lr.render_html(rows, run, run["retention"]))
    shot = tmp_path / "leaderboard.png"
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--hide-scrollbars", f"--screenshot={shot}", f"--window-size={WIDTH},{HEIGHT}", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert shot.is_file(), f"chromium wrote no screenshot (rc {result.returncode}): {result.stderr[-2000:]}"
    from PIL import Image

    with Image.open(shot) as image:
        assert image.size == (WIDTH, HEIGHT)
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20) or []
    # Non-trivial: many distinct colours, and the page's own ones are there (adapter indigo, missed-target red).
    assert len(colours) > 500, f"only {len(colours)} distinct colours: the page looks blank"
    present = {rgb for _, rgb in colours}
    assert (0x4F, 0x46, 0xE5) in present, "no adapter bars (#4f46e5) drawn"
    assert (0x7F, 0x1D, 0x1D) in present or (0xB9, 0x1C, 0x1C) in present, "no missed-target colour drawn"
