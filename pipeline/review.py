"""The surgeon's confirmation page: ``fusionct review OUTDIR`` serves it on 127.0.0.1.

Every finding (screw, cage, level) is shown with its key images and value; the surgeon
accepts, rejects or corrects each (a corrected value, optionally a corrected class, and a
comment), types their name and signs. Signing:

1. validates (every finding decided, a corrected value for each correction, a name);
2. builds the VERIFIED SR in memory when the draft report_sr.dcm exists
   (report_sr_verified.dcm: VerificationFlag VERIFIED, VerifyingObserverSequence with the
   name, PredecessorDocumentsSequence -> the draft, corrected values applied, rejected
   findings left out; CompletionFlag COMPLETE, since DICOM permits VERIFIED only on a
   complete document and the surgeon has decided every finding);
3. creates confirmation.json (exclusive create: it is the commit point; a second signing,
   even from another process, fails with 409);
4. creates report_sr_verified.dcm (exclusive create);
5. rewrites measurements.json atomically with ``status: "confirmed"``, a ``confirmation``
   summary and a ``review`` entry on every item. Measured values stay as measured; the
   surgeon's corrections live in ``review`` and confirmation.json.

A run killed between 3 and 5 is finished from confirmation.json the next time the folder is
served (``finish_confirmation``). Nothing identifying a patient is logged; the server logs
method, path and status only.

What a correction changes (quantity per kind)
---------------------------------------------
- screw: ``halo_max_mm`` (the widest halo a reader measures); class ``loosening``
  (yes/no). Without an explicit class, a corrected width below the halo threshold means no
  loosening (coverage cannot then reach the criterion), otherwise the class is kept.
- cage: ``subsidence_mm`` (the larger endplate); class ``subsidence_grade``, derived from
  the criteria when not given. In the SR the endplate that was the larger takes the
  corrected value and the other is capped at it.
- level: ``bridging_fraction`` (0..1); class ``fusion``, derived from the criteria when
  not given.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import math
import re
import secrets
import threading
from dataclasses import replace
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from pipeline import __version__
from pipeline.atomic import write_bytes_exclusive, write_json_atomic
from pipeline.config import Criteria
from pipeline.outputs import (
    CONFIRMATION,
    EVIDENCE,
    MEASUREMENTS,
    SR_DRAFT,
    SR_VERIFIED,
    is_confirmed,
    load_evidence_index,
    load_figures,
)
from pipeline.report_html import CSS, borderline_badge, borderline_keys, esc, finding_key, img_tag
from pipeline.report_json import result_from_measurements

log = logging.getLogger("fusionct.review")

DECISIONS = ("accepted", "rejected", "corrected")
MAX_BODY_BYTES = 1_000_000

QUANTITY = {
    "screw": ("halo_max_mm", "mm", "loosening", ["true", "false"]),
    "cage": ("subsidence_mm", "mm", "subsidence_grade", ["none", "mild", "severe"]),
    "level": ("bridging_fraction", "fraction 0..1", "fusion", ["fused", "partial", "not_fused"]),
}


class ReviewError(Exception):
    """A sign request that cannot be accepted; ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, problems: list[str]):
        self.status = status
        self.problems = problems
        super().__init__("; ".join(problems))


# ------------------------------------------------------------------------------ findings
def read_measurements(outdir: str | Path) -> dict:
    return json.loads((Path(outdir) / MEASUREMENTS).read_text(encoding="utf-8"))


def _class_text(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def list_findings(doc: dict) -> list[dict]:
    """Every finding to decide, in report order (screws, cages, levels).

    Each: ``key, kind, id, title, quantity, unit, original_value, class_name,
    original_class, class_options, summary``.
    """
    out = []
    for kind, items, id_field in (("screw", doc.get("screws", []), "id"),
                                  ("cage", doc.get("cages", []), "id"),
                                  ("level", doc.get("levels", []), "level")):
        qty, unit, cls, options = QUANTITY[kind]
        for item in items:
            ident = str(item[id_field])
            if kind == "screw":
                title = f"Screw {ident} ({item.get('vertebra') or '?'} {item.get('side') or ''})".replace(" )", ")")
                summary = (f"halo mean {item['halo_mean_mm']:.2f} mm, max {item['halo_max_mm']:.2f} mm, "
                           f"coverage {100 * item['halo_coverage']:.0f} %: "
                           + ("LOOSENING" if item["loosening"] else "no loosening"))
            elif kind == "cage":
                title = f"Cage {ident} ({item.get('level') or '?'})"
                summary = (f"subsidence superior {item['subsidence_superior_mm']:.2f} mm, inferior "
                           f"{item['subsidence_inferior_mm']:.2f} mm: {item['subsidence_grade']}")
            else:
                title = f"Level {ident}"
                summary = (f"bridging {100 * item['bridging_fraction']:.0f} %: "
                           f"{item['fusion'].replace('_', ' ')}")
            out.append({"key": finding_key(kind, ident), "kind": kind, "id": ident, "title": title,
                        "quantity": qty, "unit": unit, "original_value": item.get(qty),
                        "class_name": cls, "original_class": _class_text(item.get(cls)),
                        "class_options": options, "summary": summary})
    return out


def doc_fingerprint(doc: dict) -> str:
    """Short hash of the results a page was rendered from (sent back with the form, so a
    page older than the current measurements.json cannot sign it)."""
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32]


def person_name(typed: str) -> str:
    """A typed name ("Dr Jane Smith", "Smith, Jane") as a DICOM PN ("Smith^Jane^^Dr")."""
    t = re.sub(r"[\\\x00-\x1f]", " ", typed).strip()
    t = re.sub(r"\s+", " ", t)
    if "^" in t:
        return t[:64 * 5]
    prefix = ""
    m = re.match(r"^(dr\.?|prof\.?|mr\.?|mrs\.?|ms\.?)\s+", t, flags=re.I)
    if m:
        prefix, t = m.group(1), t[m.end():]
    if "," in t:
        family, given = (s.strip() for s in t.split(",", 1))
    else:
        parts = t.split(" ")
        family, given = parts[-1], " ".join(parts[:-1])
    pn = f"{family[:64]}^{given[:64]}"
    if prefix:
        pn += f"^^{prefix[:64]}"
    return pn


def _parse_value(kind: str, text: str) -> float:
    v = float(text.strip().replace(",", "."))
    if not math.isfinite(v) or v < 0:
        raise ValueError("must be a finite number >= 0")
    if kind == "level" and v > 1:
        raise ValueError("a bridging fraction is between 0 and 1")
    return v


def validate_submission(findings: list[dict], form: dict[str, str]) -> tuple[str, str | None, list[dict]]:
    """Check a sign form and return ``(name, organization, decisions)``.

    Form fields: ``name``, ``organization`` (optional), and per finding *n* (its position in
    ``findings``): ``d<n>`` decision, ``v<n>`` corrected value, ``c<n>`` corrected class
    (optional), ``m<n>`` comment.

    Raises
    ------
    ReviewError
        400 with every problem listed.
    """
    problems = []
    name = (form.get("name") or "").strip()
    if not name:
        problems.append("Type your name before signing.")
    org = (form.get("organization") or "").strip() or None
    decisions = []
    for n, f in enumerate(findings):
        d = (form.get(f"d{n}") or "").strip()
        comment = (form.get(f"m{n}") or "").strip()
        entry = {"id": f["id"], "kind": f["kind"], "decision": d, "quantity": f["quantity"],
                 "unit": f["unit"], "original_value": f["original_value"], "corrected_value": None,
                 "class_name": f["class_name"], "original_class": f["original_class"],
                 "corrected_class": None, "comment": comment}
        if d not in DECISIONS:
            problems.append(f"{f['title']}: choose accept, reject or correct.")
        elif d == "corrected":
            vtext = (form.get(f"v{n}") or "").strip()
            try:
                entry["corrected_value"] = _parse_value(f["kind"], vtext)
            except ValueError as exc:
                problems.append(f"{f['title']}: corrected {f['quantity']} is needed "
                                f"({exc if vtext else 'empty'}).")
            ctext = (form.get(f"c{n}") or "").strip()
            if ctext:
                if ctext not in f["class_options"]:
                    problems.append(f"{f['title']}: unknown {f['class_name']} '{ctext}'.")
                else:
                    entry["corrected_class"] = ctext
        decisions.append(entry)
    if problems:
        raise ReviewError(HTTPStatus.BAD_REQUEST, problems)
    return name, org, decisions


# ---------------------------------------------------------------- applying corrections
def derive_class(kind: str, value: float, original_class: str, criteria: Criteria) -> str:
    """The class a corrected value implies (see module docstring)."""
    if kind == "cage":
        return criteria.subsidence_grade(value)
    if kind == "level":
        return criteria.fusion_class(value)
    if value < criteria.halo_threshold_mm:  # screw: a 95th percentile below the threshold
        return "false"
    return original_class


def corrected_result(doc: dict, decisions: list[dict]):
    """The StudyResult the verified SR reports: corrections applied, rejected findings
    removed. Returns ``(result, any_rejected)``."""
    result = result_from_measurements(doc)
    crit = Criteria.from_json(doc.get("criteria"))
    by_key = {(d["kind"], d["id"]): d for d in decisions}
    rejected = False

    def decided(kind: str, items, key, correct):
        """Items kept after ``kind`` decisions: rejected dropped, corrected rebuilt."""
        nonlocal rejected
        kept = []
        for item in items:
            d = by_key.get((kind, key(item)))
            if d and d["decision"] == "rejected":
                rejected = True
                continue
            if d and d["decision"] == "corrected":
                v = d["corrected_value"]
                cls = d["corrected_class"] or derive_class(kind, v, d["original_class"], crit)
                item = correct(item, v, cls)
            kept.append(item)
        return kept

    def correct_screw(s, v, cls):
        return replace(s, halo_max_mm=v, halo_mean_mm=min(s.halo_mean_mm, v), loosening=(cls == "true"))

    def correct_cage(c, v, cls):
        if c.subsidence_superior_mm >= c.subsidence_inferior_mm:
            c = replace(c, subsidence_superior_mm=v, subsidence_inferior_mm=min(c.subsidence_inferior_mm, v))
        else:
            c = replace(c, subsidence_inferior_mm=v, subsidence_superior_mm=min(c.subsidence_superior_mm, v))
        return replace(c, subsidence_grade=cls)

    screws = decided("screw", result.screws, lambda s: s.id, correct_screw)
    cages = decided("cage", result.cages, lambda c: c.id, correct_cage)
    levels = decided("level", result.levels, lambda lv: lv.level,
                     lambda lv, v, cls: replace(lv, bridging_fraction=v, fusion=cls))
    return replace(result, screws=tuple(screws), cages=tuple(cages), levels=tuple(levels),
                   status="confirmed"), rejected


def verified_sr_bytes(outdir: Path, doc: dict, decisions: list[dict], name: str, org: str | None,
                      sop_instance_uid: str) -> bytes | None:
    """The VERIFIED successor of the draft SR, or None when there is no draft."""
    draft_path = outdir / SR_DRAFT
    if not draft_path.exists():
        return None
    import pydicom

    from pipeline import report_sr

    draft = pydicom.dcmread(str(draft_path))
    refs = []
    if (outdir / EVIDENCE).exists():
        _, _, refs = load_evidence_index(outdir / EVIDENCE)
    headers = (report_sr.headers_from_refs(refs, draft) if refs
               else report_sr.headers_from_sr_evidence(draft))
    result, _rejected = corrected_result(doc, decisions)
    sr = report_sr.build_sr(
        result, headers,
        series_instance_uid=draft.SeriesInstanceUID,
        sop_instance_uid=sop_instance_uid,
        instance_number=int(draft.get("InstanceNumber", 1) or 1) + 1,
        complete=True,  # VERIFIED requires COMPLETE (PS3.3 C.17.2); every finding was decided
        verifying_observer_name=person_name(name),
        verifying_organization=(org or str(draft.get("InstitutionName", "")) or "not given")[:64],
        predecessor=draft,
    )
    return report_sr.sr_bytes(sr)


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _confirmed_doc(doc: dict, confirmation: dict) -> dict:
    """measurements.json after signing: status confirmed, review per item, values as measured."""
    new = json.loads(json.dumps(doc))
    new["status"] = "confirmed"
    new["confirmation"] = {"file": CONFIRMATION, "confirmed_at_utc": confirmation["confirmed_at_utc"],
                           "verified_sr": confirmation.get("verified_sr")}
    by_key = {(d["kind"], d["id"]): d for d in confirmation["findings"]}
    for kind, items, id_field in (("screw", new.get("screws", []), "id"),
                                  ("cage", new.get("cages", []), "id"),
                                  ("level", new.get("levels", []), "level")):
        for item in items:
            d = by_key.get((kind, str(item[id_field])))
            if d:
                item["review"] = {"decision": d["decision"], "corrected_value": d["corrected_value"],
                                  "corrected_class": d["corrected_class"], "comment": d["comment"]}
    return new


def sign(outdir: str | Path, form: dict[str, str], lock: threading.Lock | None = None) -> dict:
    """Validate a sign form and write confirmation.json, the verified SR and the confirmed
    measurements.json (see module docstring). Returns the confirmation document.

    Raises
    ------
    ReviewError
        409 when the study is already confirmed, 400 when the form is incomplete.
    """
    outdir = Path(outdir)
    lock = lock or threading.Lock()
    with lock:
        if is_confirmed(outdir):
            raise ReviewError(HTTPStatus.CONFLICT, ["This study is already confirmed; it cannot be signed again."])
        raw = (outdir / MEASUREMENTS).read_bytes()
        doc = json.loads(raw)
        if "results" in form and form["results"] != doc_fingerprint(doc):
            raise ReviewError(HTTPStatus.CONFLICT, ["The results changed since this page was loaded "
                                                   "(the study was analyzed again); reload the page."])
        findings = list_findings(doc)
        name, org, decisions = validate_submission(findings, form)
        import highdicom as hd

        sr_uid = str(hd.UID())
        sr_data = verified_sr_bytes(outdir, doc, decisions, name, org, sr_uid)
        confirmation = {
            "schema_version": 1,
            "study_instance_uid": (doc.get("input") or {}).get("study_instance_uid"),
            "confirmed_by": name,
            "organization": org,
            "confirmed_at_utc": _utc_now(),
            "software": {"name": "fusionct", "version": __version__},
            "measurements_sha256": hashlib.sha256(raw).hexdigest(),
            "verified_sr": SR_VERIFIED if sr_data is not None else None,
            "verified_sr_sop_instance_uid": sr_uid if sr_data is not None else None,
            "findings": [{k: d[k] for k in ("id", "kind", "decision", "quantity", "unit",
                                            "original_value", "corrected_value", "class_name",
                                            "original_class", "corrected_class", "comment")}
                         for d in decisions],
        }
        text = json.dumps(confirmation, indent=2, allow_nan=False) + "\n"
        try:
            write_bytes_exclusive(outdir / CONFIRMATION, text.encode("utf-8"))
        except FileExistsError:
            raise ReviewError(HTTPStatus.CONFLICT, ["This study is already confirmed; it cannot be signed again."]) from None
        if sr_data is not None:
            write_bytes_exclusive(outdir / SR_VERIFIED, sr_data)
        write_json_atomic(outdir / MEASUREMENTS, _confirmed_doc(doc, confirmation))
        log.info("study confirmed: %d findings decided", len(decisions))
        return confirmation


def finish_confirmation(outdir: str | Path) -> bool:
    """Complete a signing that was interrupted after confirmation.json was written (verified
    SR and/or measurements.json status missing). Returns True when something was finished."""
    outdir = Path(outdir)
    conf_path = outdir / CONFIRMATION
    if not conf_path.exists():
        return False
    conf = json.loads(conf_path.read_text(encoding="utf-8"))
    doc = read_measurements(outdir)
    did = False
    if conf.get("verified_sr") and not (outdir / SR_VERIFIED).exists() and doc.get("status") != "confirmed":
        data = verified_sr_bytes(outdir, doc, conf["findings"], conf["confirmed_by"],
                                 conf.get("organization"), conf["verified_sr_sop_instance_uid"])
        if data is not None:
            write_bytes_exclusive(outdir / SR_VERIFIED, data)
            did = True
    if doc.get("status") != "confirmed":
        write_json_atomic(outdir / MEASUREMENTS, _confirmed_doc(doc, conf))
        did = True
    return did


# ---------------------------------------------------------------------------- the page
PAGE_JS = """
function sync(n){var d=document.querySelector('input[name=d'+n+']:checked');
var box=document.getElementById('corr'+n);if(box){box.style.display=(d&&d.value=='corrected')?'block':'none';}}
document.querySelectorAll('input[type=radio]').forEach(function(r){r.addEventListener('change',function(){sync(r.dataset.n)});sync(r.dataset.n);});
"""


def render_page(doc: dict, figures: dict, token: str, form: dict | None = None,
                problems: list[str] | None = None, confirmation: dict | None = None) -> str:
    """The review page: a form per finding, or the confirmation summary once signed."""
    form = form or {}
    inp = doc.get("input") or {}
    head = (f"<p>Study Instance UID {esc(inp.get('study_instance_uid') or '–')}; series "
            f"{esc(inp.get('series_instance_uid') or '–')}"
            + (f" ({esc(inp.get('series_description'))})" if inp.get("series_description") else "")
            + '. <a href="/report.html">Full report</a></p>')
    notes = "".join(f"<li>{esc(n)}</li>" for n in doc.get("notes", []))
    notes = f'<h2>What the analysis was unsure of</h2><ul class="notes">{notes}</ul>' if notes else ""
    findings = list_findings(doc)
    if confirmation is not None or doc.get("status") == "confirmed":
        conf = confirmation or {}
        rows = "".join(
            f"<tr><td>{esc(d['kind'])}</td><td>{esc(d['id'])}</td><td>{esc(d['decision'])}</td>"
            f"<td>{esc(d['original_value'])}</td><td>{esc(d['corrected_value'])}</td>"
            f"<td>{esc(d['corrected_class'])}</td><td>{esc(d['comment'])}</td></tr>"
            for d in conf.get("findings", []))
        body = (f'<p class="state" id="signed"><b>Confirmed by {esc(conf.get("confirmed_by", "?"))} at '
                f"{esc(conf.get('confirmed_at_utc', '?'))} (UTC).</b> This study cannot be signed again.</p>"
                "<table><tr><th>Kind</th><th>Id</th><th>Decision</th><th>Original</th>"
                f"<th>Corrected</th><th>Corrected class</th><th>Comment</th></tr>{rows}</table>")
        return _page(head + body)
    err = ""
    if problems:
        err = ('<div id="problems" style="border:2px solid #b00;padding:.5em"><b>Not signed:</b><ul>'
               + "".join(f"<li>{esc(p)}</li>" for p in problems) + "</ul></div>")
    blocks = []
    near = borderline_keys(result_from_measurements(doc))
    for n, f in enumerate(findings):
        figs = "".join(img_tag(fig, f["title"]) for fig in figures.get(f["key"], []))
        chosen = form.get(f"d{n}", "")
        radios = "".join(
            f'<label><input type="radio" name="d{n}" value="{d}" data-n="{n}" '
            f'id="d{n}-{d}"{" checked" if chosen == d else ""}> {label}</label> '
            for d, label in (("accepted", "accept"), ("rejected", "reject"), ("corrected", "correct")))
        opts = '<option value="">(derive from value)</option>' + "".join(
            f'<option value="{esc(o)}"{" selected" if form.get(f"c{n}") == o else ""}>{esc(o)}</option>'
            for o in f["class_options"])
        ov = f["original_value"]
        blocks.append(
            f'<div class="finding" id="finding-{n}" data-key="{esc(f["key"])}">'
            f'<b>{esc(f["title"])}</b>: {esc(f["summary"])} <span class="badge await">awaiting confirmation</span>'
            + borderline_badge(near, f["kind"], f["id"]) + "<br>"
            f"{figs}<div>{radios}</div>"
            f'<div id="corr{n}">Corrected {esc(f["quantity"])} ({esc(f["unit"])}, was '
            f'{esc(round(ov, 3) if isinstance(ov, float) else ov)}): '
            f'<input name="v{n}" id="v{n}" inputmode="decimal" size="8" value="{esc(form.get(f"v{n}", ""))}"> '
            f'{esc(f["class_name"])}: <select name="c{n}" id="c{n}">{opts}</select></div>'
            f'<div>Comment: <input name="m{n}" id="m{n}" size="70" value="{esc(form.get(f"m{n}", ""))}"></div>'
            "</div>")
    body = (f"{err}<form method=\"post\" action=\"/sign\" id=\"review\">"
            f'<input type="hidden" name="token" value="{esc(token)}">'
            f'<input type="hidden" name="results" value="{doc_fingerprint(doc)}">'
            + "".join(blocks)
            + '<h2>Sign</h2><p>Your name: <input name="name" id="name" size="40" '
            f'value="{esc(form.get("name", ""))}"> Organization (optional): '
            f'<input name="organization" id="organization" size="30" value="{esc(form.get("organization", ""))}"></p>'
            '<p><button type="submit" id="sign">Sign and confirm</button></p></form>'
            f"<script>{PAGE_JS}</script>")
    return _page(head + notes + f"<h2>Findings ({len(findings)})</h2>" + body)


def _page(body: str) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<title>fusionct review</title>"
            f"<style>{CSS}</style></head><body><h1>fusionct: confirm the findings</h1>{body}</body></html>\n")


# ---------------------------------------------------------------------------- server
class ReviewServer(ThreadingHTTPServer):
    """ThreadingHTTPServer bound to one output folder."""

    daemon_threads = True

    def __init__(self, outdir: Path, address, handler):
        self.outdir = Path(outdir)
        self.token = secrets.token_urlsafe(16)
        self.sign_lock = threading.Lock()
        self._figures: dict = {}
        self._figures_stamp = None
        super().__init__(address, handler)

    @property
    def figures(self) -> dict:
        """Key images from evidence.npz, re-read when the file changes (a new analysis)."""
        path = self.outdir / EVIDENCE
        try:
            st = path.stat()
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            return {}
        if stamp != self._figures_stamp:
            self._figures = load_figures(path)
            self._figures_stamp = stamp
        return self._figures


class ReviewHandler(BaseHTTPRequestHandler):
    server: ReviewServer
    server_version = "fusionct-review"

    def log_message(self, fmt, *args):  # method, path and status only; no bodies
        log.info("%s %s", self.command, urlsplit(self.path).path)

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy",
                         "default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
                         "script-src 'unsafe-inline'; form-action 'self'")
        self.end_headers()
        self.wfile.write(body)

    def _html(self, status: int, text: str) -> None:
        self._send(status, text.encode("utf-8"), "text/html; charset=utf-8")

    def _host_ok(self) -> bool:
        """Refuse requests whose Host header is not this server (DNS-rebinding guard)."""
        host = (self.headers.get("Host") or "").strip().lower()
        bound, port = self.server.server_address[:2]
        if not str(bound).startswith("127.") and str(bound) != "::1":
            return True  # bound beyond loopback on purpose (--host): any name may reach it
        allowed = {f"{h}:{port}" for h in ("127.0.0.1", "localhost", "[::1]", str(bound).lower())}
        if host in allowed:
            return True
        self._html(421, _page("<p>Wrong host.</p>"))
        return False

    def _confirmation(self) -> dict | None:
        p = self.server.outdir / CONFIRMATION
        return json.loads(p.read_text(encoding="utf-8")) if p.exists() else None

    def do_GET(self):
        if not self._host_ok():
            return
        path = urlsplit(self.path).path
        out = self.server.outdir
        if path in ("/", "/index.html"):
            doc = read_measurements(out)
            self._html(200, render_page(doc, self.server.figures, self.server.token,
                                        confirmation=self._confirmation()))
        elif path == "/findings.json":
            doc = read_measurements(out)
            self._send(200, json.dumps({"status": doc.get("status"), "findings": list_findings(doc)}).encode(),
                       "application/json")
        elif path == "/confirmation.json" and (out / CONFIRMATION).exists():
            self._send(200, (out / CONFIRMATION).read_bytes(), "application/json")
        elif path == "/report.html" and (out / "report.html").exists():
            self._send(200, (out / "report.html").read_bytes(), "text/html; charset=utf-8")
        else:
            self._html(404, _page("<p>Not found.</p>"))

    def do_POST(self):
        if not self._host_ok():
            return
        path = urlsplit(self.path).path
        if path != "/sign":
            self._html(404, _page("<p>Not found.</p>"))
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            self._html(413, _page("<p>Request too large.</p>"))
            return
        raw = self.rfile.read(length).decode("utf-8", errors="replace")
        form = {k: v[-1] for k, v in parse_qs(raw, keep_blank_values=True).items()}
        out = self.server.outdir
        if not secrets.compare_digest(form.get("token", ""), self.server.token):
            self._html(403, _page("<p>This form is stale or did not come from this page; reload it.</p>"))
            return
        try:
            conf = sign(out, form, self.server.sign_lock)
        except ReviewError as exc:
            doc = read_measurements(out)
            if exc.status == HTTPStatus.CONFLICT and not is_confirmed(out):  # results changed
                self._html(409, render_page(doc, self.server.figures, self.server.token,
                                            problems=exc.problems))
            elif exc.status == HTTPStatus.CONFLICT:
                self._html(409, render_page(doc, self.server.figures, self.server.token,
                                            confirmation=self._confirmation())
                           .replace("<body>", "<body><p id=\"conflict\"><b>Already confirmed.</b></p>", 1))
            else:
                self._html(int(exc.status), render_page(doc, self.server.figures, self.server.token,
                                                        form=form, problems=exc.problems))
            return
        self._html(200, render_page(read_measurements(out), self.server.figures, self.server.token,
                                    confirmation=conf))


def make_server(outdir: str | Path, host: str = "127.0.0.1", port: int = 8765) -> ThreadingHTTPServer:
    """A review server for one analyzed study folder (port 0 = any free port).

    Finishes an interrupted signing first (``finish_confirmation``).
    """
    outdir = Path(outdir)
    if not (outdir / MEASUREMENTS).exists():
        from pipeline.errors import InputError

        raise InputError(outdir, "no measurements.json here: analyze the study first")
    finish_confirmation(outdir)
    return ReviewServer(outdir, (host, port), ReviewHandler)


def serve(outdir: str | Path, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Serve the review page until interrupted (``fusionct review OUTDIR``)."""
    server = make_server(outdir, host, port)
    h, p = server.server_address[:2]
    print(f"fusionct review: http://{h}:{p}/  (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
