"""A surgeon's session in a real browser: Debian's Chromium driven by Playwright opens the
review page, decides every finding (one corrected, with a value and a comment), signs, and
the files on disk say so. Never downloads a browser."""
from __future__ import annotations

import json
import shutil
import sys
import threading
from pathlib import Path

import pydicom
import pytest

from pipeline.outputs import write_outputs
from pipeline.report_json import validate_measurements
from pipeline.review import list_findings, make_server

sys.path.insert(0, str(Path(__file__).resolve().parent))  # helpers live in test_outputs.py
from test_outputs import dicom_study, truth_evidence, truth_result  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.slow


@pytest.fixture()
def served(tmp_path):
    if not CHROMIUM.exists():
        pytest.skip("Debian's /usr/bin/chromium is not installed (apt-get install chromium); "
                    "this test never downloads a browser")
    pytest.importorskip("playwright.sync_api", reason="playwright python package not installed")
    vol, truth = dicom_study(tmp_path)
    out = write_outputs(tmp_path / "out", truth_result(truth), truth_evidence(truth), vol)
    server = make_server(out, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    yield f"http://{host}:{port}/", out, truth
    server.shutdown()
    server.server_close()


def test_surgeon_decides_every_finding_and_signs_in_chromium(served, tmp_path):
    from playwright.sync_api import sync_playwright

    url, out, truth = served
    findings = list_findings(json.loads((out / "measurements.json").read_text()))
    ci = next(n for n, f in enumerate(findings) if f["kind"] == "cage")
    cage_id = findings[ci]["id"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(url)
            assert page.locator("div.finding").count() == len(findings)
            # every finding shows at least one key image that actually decoded
            widths = page.eval_on_selector_all("div.finding img", "els => els.map(e => e.naturalWidth)")
            assert len(widths) >= len(findings) and min(widths) > 0
            # the correction box is hidden until "correct" is chosen
            assert not page.locator(f"#v{ci}").is_visible()
            for n in range(len(findings)):
                page.check(f"#d{n}-{'corrected' if n == ci else 'accepted'}")
            assert page.locator(f"#v{ci}").is_visible()
            page.fill(f"#v{ci}", "3.1")
            page.select_option(f"#c{ci}", "mild")
            page.fill(f"#m{ci}", "inferior endplate deeper on sagittal")
            page.fill("#name", "Dr Ada Example")
            page.screenshot(path=str(tmp_path / "review_before_sign.png"), full_page=True)
            with page.expect_navigation():
                page.click("#sign")
            assert page.locator("#signed").count() == 1
            assert "Confirmed by Dr Ada Example" in page.inner_text("#signed")
        finally:
            browser.close()

    conf = json.loads((out / "confirmation.json").read_text())
    assert conf["confirmed_by"] == "Dr Ada Example"
    assert [(f["kind"], f["id"]) for f in conf["findings"]] == [(f["kind"], f["id"]) for f in findings]
    corrected = [f for f in conf["findings"] if f["decision"] == "corrected"]
    assert len(corrected) == 1 and corrected[0]["id"] == cage_id
    assert corrected[0]["corrected_value"] == 3.1 and corrected[0]["corrected_class"] == "mild"
    assert corrected[0]["comment"] == "inferior endplate deeper on sagittal"
    assert all(f["decision"] == "accepted" for f in conf["findings"] if f["id"] != cage_id)

    doc = json.loads((out / "measurements.json").read_text())
    validate_measurements(doc)
    assert doc["status"] == "confirmed"

    draft = pydicom.dcmread(out / "report_sr.dcm")
    ver = pydicom.dcmread(out / "report_sr_verified.dcm")
    assert draft.VerificationFlag == "UNVERIFIED"
    assert ver.VerificationFlag == "VERIFIED"
    assert str(ver.VerifyingObserverSequence[0].VerifyingObserverName) == "Example^Ada^^Dr"
    pred = ver.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert pred.ReferencedSOPInstanceUID == draft.SOPInstanceUID
    if shutil.which("dsrdump"):
        import subprocess

        text = subprocess.run(["dsrdump", str(out / "report_sr_verified.dcm")], capture_output=True,
                              text=True, timeout=60).stdout
        assert '"Cage subsidence")="3.1" (mm,UCUM' in text
