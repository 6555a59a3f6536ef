"""The live page of ``crystalmapping serve --http``, in a real headless Chromium.

A scan is published slowly through bluesky's 0MQ proxy to a ``crystalmapping
serve`` subprocess started with ``--http``; the page, opened before the scan,
must show the run's maps growing with the partial stores and, at the end,
exactly the maps of the final store, drawn (not blank).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import threading
import time
import urllib.request

import numpy as np
import pytest

import crystalmapping as cm
from crystalmapping.liveview import LiveView, parse_http_address
from crystalmapping.wire import packb

from test_serve import (BACKGROUND, CLI, Process, free_port, handshake,  # noqa: F401
                        proxy, scan_with_empty_first_point, wait_for_report)


def _browser_binaries():
    browser = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")
                    if shutil.which(n)), None)
    return browser, shutil.which("chromedriver")


@pytest.fixture
def chrome(tmp_path):
    browser, driver_path = _browser_binaries()
    if browser is None or driver_path is None:
        pytest.skip("no Chromium and chromedriver on this machine (Debian: apt-get install "
                    "chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1200,900", f"--user-data-dir={tmp_path / 'chrome-profile'}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    yield driver
    driver.quit()


def _panels(driver) -> dict:
    """What the page shows: maps announced, panels drawn, points, state."""
    return driver.execute_script("""
        const imgs = [...document.querySelectorAll('img.map-panel')];
        return {n_maps: Number(document.getElementById('n-maps').dataset.nMaps),
                panels: imgs.length,
                drawn: imgs.filter(i => i.complete && i.naturalWidth > 0).length,
                points: document.getElementById('run-points').textContent,
                // every image of the store's latest write on screen
                complete: document.body.dataset.drawn !== undefined &&
                          document.body.dataset.drawn ===
                          document.getElementById('n-maps').dataset.version,
                state: document.getElementById('run-state').textContent,
                src: imgs.length ? imgs[0].src : null};""")


def _measured(shown: dict) -> int:
    head = shown["points"].split("/")[0].strip()
    return int(head) if head.isdigit() else 0


def test_live_page_in_a_browser(proxy, chrome, tmp_path):  # noqa: F811 (the fixture)
    from bluesky.callbacks.zmq import Publisher
    from PIL import Image

    t0 = time.monotonic()
    port = free_port()
    out = tmp_path / "maps"
    s = Process(CLI + ["serve", "--address", proxy.out_address, "--prefix", "page",
                       "--workers", "1", "--out-dir", str(out), "--report",
                       str(tmp_path / "report.jsonl"), "--background", str(BACKGROUND),
                       "--partial-every-points", "4", "--partial-every-seconds", "1",
                       "--http", f"127.0.0.1:{port}"], tmp_path / "serve.log")
    samples = {}
    try:
        s.wait_for("serving: documents", timeout=120)
        assert f"live page: http://127.0.0.1:{port}/" in s.text()
        url = f"http://127.0.0.1:{port}/"
        marks = {"served": time.monotonic() - t0}
        chrome.get(url)
        scan = scan_with_empty_first_point(seed=3)
        docs = list(scan.documents(external=False))
        uid = docs[0][1]["uid"]
        publisher = Publisher(proxy.in_address, prefix=b"page", serializer=packb)
        handshake(lambda tag: publisher(tag, {}), s, "page-probe")

        def publish():  # about 8 s of scan, so the page sees the maps grow
            for name, doc in docs:
                publisher(name, doc)
                if name == "event":
                    time.sleep(0.2)

        sender = threading.Thread(target=publish, daemon=True)
        sender.start()
        total = scan.n_points
        targets = {25: total // 4, 50: total // 2, 100: total}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(samples) < len(targets):
            shown = _panels(chrome)
            for pct, n in targets.items():
                if pct not in samples and _measured(shown) >= n and shown["complete"]:
                    samples[pct] = shown
                    chrome.save_screenshot(str(tmp_path / f"liveview-{pct}.png"))
            time.sleep(0.2)
        marks["sampled"] = time.monotonic() - t0
        sender.join(30)
        marks["published"] = time.monotonic() - t0
        publisher.close()
        wait_for_report(tmp_path / "report.jsonl", uid)
        marks["reported"] = time.monotonic() - t0
        store = cm.open_maps(out / f"{uid}.zarr")
        n_final = store.sizes["grain"]
        assert n_final >= 2
        while time.monotonic() < deadline:  # the final store on the page
            shown = _panels(chrome)
            if (shown["state"] == "finished" and shown["n_maps"] == n_final
                    and shown["drawn"] == n_final):
                break
            time.sleep(0.2)
        marks["final page"] = time.monotonic() - t0
        assert shown["n_maps"] == shown["panels"] == shown["drawn"] == n_final, shown
        assert shown["points"].startswith(f"{total} / {total}")
        chrome.save_screenshot(str(tmp_path / "liveview.png"))
        # a panel is drawn: a PNG of more than one colour, in its grain's colour
        png = urllib.request.urlopen(shown["src"], timeout=10).read()
        pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
        colours = np.unique(pixels.reshape(-1, 3), axis=0)
        assert pixels.shape[1] > 50 and len(colours) >= 2, colours
        assert (np.ptp(colours.astype(int), axis=1) > 60).any()  # a saturated grain colour
        runs = json.loads(urllib.request.urlopen(url + "api/runs", timeout=10).read())["runs"]
        row = next(r for r in runs if r["uid"] == uid)
        assert row["state"] == "finished" and row["points"] == total
        assert row["maps"] == n_final and row["latency_median_s"] > 0
    finally:
        code = s.stop(signal.SIGINT)
    assert code == 0, s.text()
    assert set(samples) == {25, 50, 100}, samples
    assert samples[25]["panels"] <= samples[50]["panels"] <= samples[100]["panels"]
    counts = {pct: (sample["panels"], sample["points"]) for pct, sample in samples.items()}
    print(f"live page: (map panels, points) at 25/50/100 % of the scan: {counts}; final store "
          f"{n_final} maps; {time.monotonic() - t0:.1f} s "
          f"({', '.join(f'{k} {v:.1f} s' for k, v in marks.items())})")


def test_page_paths_keys_and_binding(tmp_path):
    """Without a browser: uids are checked, only stores in out_dir are read, keys are checked."""
    import warnings

    with warnings.catch_warnings():  # starlette's notice that its test client will change
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient

    class NoRuns:
        def open(self):
            return []

        def runs(self):
            return []

    out = tmp_path / "maps"
    out.mkdir()
    elsewhere = tmp_path / "elsewhere.zarr"
    elsewhere.mkdir()
    (out / "linked.zarr").symlink_to(elsewhere)
    view = LiveView(NoRuns(), out, "127.0.0.1:0")
    client = TestClient(view.app())
    assert client.get("/").status_code == 200 and "crystalmapping live" in client.get("/").text
    assert client.get("/api/runs").json()["runs"] == []
    for uid in ("..", "%2e%2e", "a%2Fb", ".hidden", "x" * 200, "linked"):
        assert client.get(f"/api/runs/{uid}").status_code == 404, uid
        assert client.get(f"/runs/{uid}/total.png").status_code == 404, uid
    assert client.get("/api/runs/not-there").json()["n_maps"] == 0
    assert client.post("/api/runs").status_code == 405

    keyed = TestClient(LiveView(NoRuns(), out, "0.0.0.0:0", api_key="k3y").app())
    assert keyed.get("/api/runs").status_code == 401
    assert keyed.get("/api/runs", headers={"X-API-Key": "wrong"}).status_code == 401
    assert keyed.get("/api/runs", headers={"Authorization": "Bearer k3y"}).status_code == 200
    r = keyed.get("/?key=k3y", follow_redirects=False)
    assert r.status_code == 303 and "key=" not in r.headers["location"]
    assert keyed.get("/api/runs").status_code == 200  # the cookie

    assert parse_http_address("8050") == ("127.0.0.1", 8050)
    assert parse_http_address("[::1]:8050") == ("::1", 8050)
    for public in ("0.0.0.0:8050", "192.0.2.1:80"):
        with pytest.raises(cm.CrystalMappingError, match="without a key"):
            parse_http_address(public)
        assert parse_http_address(public, "k3y")[1] in (8050, 80)
    env = dict(os.environ)
    env.pop("CRYSTALMAPPING_HTTP_API_KEY", None)
    import subprocess

    refused = subprocess.run(CLI + ["serve", "--http", "0.0.0.0:8050", "--out-dir",
                                    str(tmp_path / "m")], capture_output=True, text=True,
                             timeout=120, env=env)
    assert refused.returncode != 0 and "without a key" in refused.stderr
