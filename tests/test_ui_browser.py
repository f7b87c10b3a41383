"""The Dagster UI in a real browser: dagster-webserver on the Postgres-backed instance where the graph ran, its
GraphQL API, and headless Chromium rendering the asset graph and the leaderboard asset's page."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.graph_on_postgres import REPO, GraphOnPostgres, expected_definitions

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
WIDTH, HEIGHT = 1600, 1000

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium); .ci/run installs it"),
]

UI_QUERY = """
query SleepTrainUi {
  workspaceOrError {
    __typename
    ... on Workspace { locationEntries { name loadStatus locationOrLoadError { __typename ... on PythonError { message } } } }
  }
  repositoriesOrError {
    __typename
    ... on RepositoryConnection { nodes { name jobs { name } sensors { name } schedules { name } } }
  }
  assetNodes {
    assetKey { path }
    groupName
    isMaterializable
    assetChecksOrError { __typename ... on AssetChecks { checks { name } } }
    assetMaterializations(limit: 1) { runId timestamp }
  }
}
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _graphql(base: str, query: str) -> dict:
    request = urllib.request.Request(f"{base}/graphql", data=json.dumps({"query": query}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        body = json.load(response)
    assert not body.get("errors"), body["errors"]
    return body["data"]


@pytest.fixture(scope="module")
def webserver(graph_on_postgres: GraphOnPostgres) -> Iterator[str]:
    """dagster-webserver on a free loopback port, on the instance where the graph was materialized."""
    port = _free_port()
    log = Path(tempfile.mkstemp(prefix="sleeptrain-webserver-", suffix=".log")[1])
    command = [str(Path(sys.executable).with_name("dagster-webserver")), "-w", "workspace.yaml",
               "-h", "127.0.0.1", "-p", str(port)]
    with log.open("w") as out:
        # Its own process group, so the code server it starts goes down with it.
        server = subprocess.Popen(command, cwd=REPO, env=graph_on_postgres.env, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, f"dagster-webserver exited:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"no /server_info after 300 s:\n{log.read_text()[-4000:]}"
            try:
                with urllib.request.urlopen(f"{base}/server_info", timeout=10) as response:
                    if response.status == 200 and "dagster_webserver_version" in json.load(response):
                        break
            except (urllib.error.URLError, OSError, ValueError):
                pass
            time.sleep(1)
        while True:  # the code location loads in the background after the server answers
            entries = _graphql(base, UI_QUERY)["workspaceOrError"]["locationEntries"]
            if entries and all(e["loadStatus"] == "LOADED" for e in entries):
                break
            assert time.monotonic() < deadline, f"code location not loaded: {entries}"
            time.sleep(1)
        yield base
    finally:
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.unlink(missing_ok=True)


def test_graphql_serves_the_asset_graph_and_the_latest_materializations(
    webserver: str, graph_on_postgres: GraphOnPostgres
) -> None:
    expected = expected_definitions()
    data = _graphql(webserver, UI_QUERY)
    (repository,) = data["repositoriesOrError"]["nodes"]
    assert {j["name"] for j in repository["jobs"] if not j["name"].startswith("__")} == expected["jobs"]
    assert {s["name"] for s in repository["sensors"]} == expected["sensors"]
    assert {s["name"] for s in repository["schedules"]} == expected["schedules"]

    nodes = {"/".join(n["assetKey"]["path"]): n for n in data["assetNodes"]}
    assert {key for key, n in nodes.items() if n["isMaterializable"]} == expected["assets"]
    checks = {(key, c["name"]) for key, n in nodes.items() for c in n["assetChecksOrError"].get("checks", [])}
    assert checks == expected["checks"]

    # Every lineage asset's latest materialization is the one run of the session, read from Postgres.
    run_ids = {key: (n["assetMaterializations"] or [{}])[0].get("runId") for key, n in nodes.items()}
    (run_id,) = {r for (r,) in _run_ids(graph_on_postgres)}
    assert {key: run_ids[key] for key in expected["lineage"]} == {key: run_id for key in expected["lineage"]}


def _run_ids(graph_on_postgres: GraphOnPostgres) -> list[tuple[str]]:
    import psycopg

    with psycopg.connect(graph_on_postgres.dagster_db_url) as conn:
        return conn.execute("SELECT run_id FROM runs").fetchall()


def _chromium(url: str, profile: Path, *action: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
         "--no-first-run", "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
         "--hide-scrollbars", f"--window-size={WIDTH},{HEIGHT}",
         # Virtual time waits for pending fetches, so the JS app has loaded its GraphQL data when it runs out.
         "--virtual-time-budget=30000", *action, url],
        capture_output=True, text=True, timeout=240,
    )


def _render(url: str, shot: Path, tmp_path: Path) -> str:
    """Screenshot of ``url`` into ``shot``; returns the DOM the app rendered (a second load of the same page)."""
    profile = tmp_path / f"chromium-{shot.stem}"
    done = _chromium(url, profile, f"--screenshot={shot}")
    assert shot.is_file(), f"chromium wrote no screenshot (rc {done.returncode}): {done.stderr[-2000:]}"
    dom = _chromium(url, profile, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    artifacts = os.environ.get("SLEEPTRAIN_TEST_ARTIFACTS")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(artifacts) / shot.name)
    return dom.stdout


def _assert_rendered_png(shot: Path) -> None:
    from PIL import Image, ImageStat

    with Image.open(shot) as image:
        assert image.size == (WIDTH, HEIGHT)
        rgb = image.convert("RGB")
        colours = rgb.getcolors(maxcolors=1 << 20) or []
        spread = ImageStat.Stat(rgb.crop((WIDTH // 3, HEIGHT // 8, WIDTH, HEIGHT))).stddev
    # A blank page or a loading spinner has a handful of colours and a flat main area.
    assert len(colours) > 500, f"{shot.name}: only {len(colours)} distinct colours: the page looks blank"
    assert max(spread) > 5, f"{shot.name}: the main area is flat ({spread})"


def test_chromium_renders_the_asset_graph_and_the_leaderboard_page(
    webserver: str, graph_on_postgres: GraphOnPostgres, tmp_path: Path
) -> None:
    expected = expected_definitions()
    # Groups start collapsed on the lineage page; `expanded` opens every one so each asset is drawn.
    groups = ",".join(f"global@global:{group}" for group in sorted(expected["groups"]))
    graph_png = tmp_path / "dagster-asset-graph.png"
    dom = _render(f"{webserver}/asset-groups?{urllib.parse.urlencode({'expanded': groups})}", graph_png, tmp_path)
    _assert_rendered_png(graph_png)
    drawn = dom.count('class="AssetNode_assetName')
    assert drawn == len(expected["assets"]), f"the graph drew {drawn} asset nodes, expected {len(expected['assets'])}"

    page_png = tmp_path / "dagster-leaderboard-asset.png"
    dom = _render(f"{webserver}/assets/leaderboard", page_png, tmp_path)
    _assert_rendered_png(page_png)
    (run_id,) = {r for (r,) in _run_ids(graph_on_postgres)}
    # The page shows the latest materialization: the run that made it (the UI prints the run id's first 8 chars).
    assert run_id[:8] in dom, "the leaderboard page does not show its latest materialization's run"
    assert "Never materialized" not in dom
