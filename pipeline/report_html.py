"""report.html: the surgeon's self-contained report (images embedded, no external assets).

Order: what study and series, what the flow was unsure of, the per-level table, then one
section per screw, cage and level with the key images the numbers were read from. Every
finding is marked "awaiting confirmation" until the review step signs it. Values come from
the same ``StudyResult`` objects as measurements.json, the CSVs and the SR.

No patient identifier appears anywhere in the page: the study is shown by its
StudyInstanceUID and date only.
"""
from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping

from pipeline import __version__
from pipeline.borderline import borderline_findings
from pipeline.config import Criteria
from pipeline.render import Figure, cage_figures, level_figure, screw_axis_figure, screw_cross_figure
from pipeline.results import (
    CageEvidence,
    CageMeasurement,
    LevelEvidence,
    LevelMeasurement,
    ScrewEvidence,
    ScrewMeasurement,
    StudyResult,
)

AWAITING = "awaiting confirmation"


def finding_key(kind: str, ident: str) -> str:
    """Stable key of one finding: ``screw:L4-left``, ``cage:C1``, ``level:L4-L5``."""
    return f"{kind}:{ident}"


def evidence_for(evidence: Mapping, kind: str, ident: str, cls):
    """The evidence object of one finding from a dict keyed by id (or ``kind:id``)."""
    for key in (finding_key(kind, ident), ident):
        ev = evidence.get(key)
        if isinstance(ev, cls):
            return ev
    for ev in evidence.values():  # keyed some other way: match by the object's own id
        if isinstance(ev, cls) and getattr(ev, "level" if cls is LevelEvidence else "id") == ident:
            return ev
    return None


def make_figures(result: StudyResult, evidence: Mapping, volume) -> dict[str, list[Figure]]:
    """Key images per finding key (see ``finding_key``); a finding without evidence gets none."""
    out: dict[str, list[Figure]] = {}
    for s in result.screws:
        ev = evidence_for(evidence, "screw", s.id, ScrewEvidence)
        if ev is not None and volume is not None:
            out[finding_key("screw", s.id)] = [
                screw_axis_figure(volume, s.head_lps_mm, s.tip_lps_mm, ev),
                screw_cross_figure(volume, s.head_lps_mm, s.tip_lps_mm, ev),
            ]
    for c in result.cages:
        ev = evidence_for(evidence, "cage", c.id, CageEvidence)
        if ev is not None and volume is not None:
            out[finding_key("cage", c.id)] = cage_figures(volume, c.centroid_lps_mm, ev)
    for lv in result.levels:
        ev = evidence_for(evidence, "level", lv.level, LevelEvidence)
        if ev is not None and volume is not None:
            out[finding_key("level", lv.level)] = [level_figure(volume, ev)]
    return out


# --------------------------------------------------------------------------- formatting
def fmt_mm(x) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.1f} mm"


def fmt_frac(x) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{100 * x:.0f} %"


def esc(x) -> str:
    return html.escape("" if x is None else str(x))


def screw_summary(s: ScrewMeasurement) -> str:
    """One line a surgeon reads: where, halo numbers, the call."""
    side = f" {s.side}" if s.side else ""
    call = "LOOSENING" if s.loosening else "no loosening"
    extra = ", double halo" if s.double_halo else ""
    return (f"{s.vertebra or '?'}{side} ({s.id}): halo mean {fmt_mm(s.halo_mean_mm)}, "
            f"max {fmt_mm(s.halo_max_mm)}, coverage {fmt_frac(s.halo_coverage)} – {call}{extra}")


def cage_summary(c: CageMeasurement) -> str:
    return (f"{c.id} ({c.material}): superior {fmt_mm(c.subsidence_superior_mm)}, inferior "
            f"{fmt_mm(c.subsidence_inferior_mm)} – subsidence {c.subsidence_grade}")


def level_summary(lv: LevelMeasurement) -> str:
    return f"bridging {fmt_frac(lv.bridging_fraction)} – {lv.fusion.replace('_', ' ')}"


def alignment_summary(lv: LevelMeasurement) -> str:
    """Segmental lordosis and disc height (with change and the adjacent-segment flag)."""
    parts = []
    if lv.segmental_lordosis_deg is not None:
        parts.append(f"segmental lordosis {lv.segmental_lordosis_deg:.1f}°")
    if lv.disc_height_mm is not None:
        parts.append(f"disc height {fmt_mm(lv.disc_height_mm)}")
    if lv.disc_height_change_mm is not None:
        parts.append(f"change since prior {fmt_mm(lv.disc_height_change_mm)}")
    if lv.adjacent_to_fusion:
        parts.append("adjacent to the fusion")
    return ", ".join(parts)


def breach_summary(s: ScrewMeasurement) -> str:
    """Pedicle breach, Gertzbein-Robbins grade (A none, B < 2, C 2-4, D 4-6, E >= 6 mm)."""
    if s.breach_grade is None:
        return ""
    where = f" {s.breach_direction}" if s.breach_direction else ""
    return f"Pedicle breach {fmt_mm(s.breach_mm)}{where}, Gertzbein-Robbins grade {s.breach_grade}."


def fracture_section(result: StudyResult) -> str:
    """Rod and screw fractures: where the gap is and how wide."""
    out = ["<h2>Rod and screw fractures</h2>"]
    if not result.fractures:
        out.append("<p>No rod or screw fracture found.</p>")
    for f in result.fractures:
        pos = ", ".join(f"{x:.1f}" for x in f.position_lps_mm)
        out.append(f'<div class="finding" id="fracture-{esc(f.id)}"><span class="flag"><b>'
                   f"{esc(f.kind.capitalize())} fracture on {esc(f.hardware_id)}</b></span>: gap "
                   f"{fmt_mm(f.gap_mm)} at LPS ({esc(pos)}) mm {_badge(result.status)}</div>")
    return "".join(out)


def _vertebrae_of(level_name: str) -> tuple[str, str]:
    parts = level_name.split("-")
    return (parts[0], parts[-1]) if len(parts) >= 2 else (level_name, level_name)


def _badge(status: str) -> str:
    label = AWAITING if status != "confirmed" else "confirmed"
    cls = "await" if status != "confirmed" else "ok"
    return f'<span class="badge {cls}">{esc(label)}</span>'


def borderline_keys(result: StudyResult) -> set[tuple[str, str]]:
    """``(kind, id)`` of the findings whose call lies within the measured error of its cut
    (:mod:`pipeline.borderline`), from the study's spacing and criteria; none when the
    spacing is not recorded."""
    spacing = (result.input or {}).get("spacing_mm")
    if not spacing:
        return set()
    found = borderline_findings(result.screws, result.cages, result.levels,
                                Criteria.from_json(result.criteria), spacing)
    return {(kind, ident) for kind, ident, _ in found if kind != "study"}


def borderline_badge(keys: set, kind: str, ident: str) -> str:
    """A "borderline" badge beside a call that could fall either side of its cut."""
    return ' <span class="badge border">borderline</span>' if (kind, ident) in keys else ""


def img_tag(fig: Figure, alt: str) -> str:
    data = base64.b64encode(fig.png).decode("ascii")
    return (f'<figure><img alt="{esc(alt)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{esc(fig.caption)}</figcaption></figure>")


CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#111;max-width:1200px}
h1{font-size:1.4em}h2{font-size:1.2em;border-bottom:1px solid #ccc;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #bbb;padding:.25em .5em;
vertical-align:top;text-align:left;font-size:.9em}th{background:#eee}
.badge{font-size:.75em;padding:.1em .4em;border-radius:.3em;white-space:nowrap}
.await{background:#fff2c2;border:1px solid #d9b200}.ok{background:#d6f5d6;border:1px solid #3a3}
.border{background:#ffe3cc;border:1px solid #c65f00}
.flag{color:#b00;font-weight:bold}figure{display:inline-block;margin:.4em;vertical-align:top;
max-width:480px}figure img{max-width:480px;image-rendering:pixelated;border:1px solid #444}
figcaption{font-size:.8em;color:#333}.finding{border:1px solid #ddd;padding:.5em;margin:.6em 0}
.notes li{color:#7a4b00}
"""


def study_header(result: StudyResult, meta: Mapping, input_info: Mapping | None = None) -> str:
    """Study and series identification (UIDs and date only), and why this series.

    ``input_info`` is measurements.json's ``input`` block when available (it is
    ``result.input`` completed from the volume)."""
    inp = dict(input_info) if input_info else dict(result.input or {})
    rows = [
        ("Study Instance UID", inp.get("study_instance_uid") or meta.get("study_instance_uid")),
        ("Study date", meta.get("study_date") or inp.get("study_date")),
        ("Series used", inp.get("series_instance_uid") or meta.get("series_instance_uid")),
        ("Series description", meta.get("series_description") or inp.get("series_description")),
        ("Why this series", meta.get("selection_reason") or inp.get("selection_reason")),
        ("Voxel spacing (mm)", ", ".join(f"{x:.2f}" for x in inp["spacing_mm"]) if inp.get("spacing_mm") else None),
        ("Software", f"fusionct {__version__}"),
    ]
    body = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v) if v is not None else '–'}</td></tr>"
                   for k, v in rows)
    crit = result.criteria or {}
    crit_rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in crit.items())
    return (f"<table>{body}</table><details><summary>Criteria used</summary>"
            f"<table>{crit_rows}</table></details>")


def unsure_section(result: StudyResult) -> str:
    """Everything the flow was unsure of: its notes, plus screws with excluded rays."""
    items = [esc(n) for n in result.notes]
    for s in result.screws:
        if s.rays_excluded:
            total = s.rays_used + s.rays_excluded
            items.append(esc(f"Screw {s.id}: {s.rays_excluded} of {total} halo rays excluded "
                             f"(metal streak or ray leaving bone)."))
    if not items:
        return "<p>Nothing flagged.</p>"
    return '<ul class="notes">' + "".join(f"<li>{i}</li>" for i in items) + "</ul>"


def level_table(result: StudyResult) -> str:
    """The per-level table: level, instrumented, bridging, fusion, cages, screws by vertebra."""
    head = ("<tr><th>Level</th><th>Instrumented</th><th>Bridging fraction</th><th>Fusion</th>"
            "<th>Cages (subsidence)</th><th>Screws, upper vertebra</th>"
            "<th>Screws, lower vertebra</th><th>Alignment</th></tr>")
    rows = []
    near = borderline_keys(result)
    for lv in result.levels:
        up, low = _vertebrae_of(lv.level)
        cages = [c for c in result.cages if c.level == lv.level]
        cage_html = "<br>".join(
            (f'<span class="flag">{esc(cage_summary(c))}</span>' if c.subsidence_grade != "none"
             else esc(cage_summary(c))) + " " + _badge(result.status)
            + borderline_badge(near, "cage", c.id) for c in cages) or "–"

        def screws_of(v):
            ss = [s for s in result.screws if s.vertebra == v]
            return "<br>".join(
                (f'<span class="flag">{esc(screw_summary(s))}</span>' if s.loosening
                 else esc(screw_summary(s))) + " " + _badge(result.status)
                + borderline_badge(near, "screw", s.id) for s in ss) or "–"

        fusion = esc(lv.fusion.replace("_", " "))
        if lv.fusion != "fused":
            fusion = f'<span class="flag">{fusion}</span>'
        fusion += " " + _badge(result.status) + borderline_badge(near, "level", lv.level)
        rows.append(
            f'<tr id="row-{esc(lv.level)}"><td>{esc(lv.level)}</td><td>{"yes" if lv.instrumented else "no"}</td>'
            f"<td>{fmt_frac(lv.bridging_fraction)}</td><td>{fusion}</td>"
            f"<td>{cage_html}</td><td>{screws_of(up)}</td><td>{screws_of(low)}</td>"
            f"<td>{esc(alignment_summary(lv)) or '–'}</td></tr>")
    listed = {v for lv in result.levels for v in _vertebrae_of(lv.level)}
    orphans = [s for s in result.screws if s.vertebra not in listed]
    extra = ""
    if orphans:
        extra = ("<p>Screws not in a listed level: " + "; ".join(esc(screw_summary(s)) for s in orphans)
                 + "</p>")
    return f'<table id="levels">{head}{"".join(rows)}</table>{extra}'


def diameter_summary(s) -> str:
    """The shaft diameter the halo was measured from, and where it came from: a catalogue
    size taken for a traced diameter within the snap tolerance says so, with the traced
    value, so a reviewer can check it against the implant record."""
    if s.traced_diameter_mm is None:
        return fmt_mm(s.diameter_mm)
    return f"{fmt_mm(s.diameter_mm)} (catalogue size; traced {s.traced_diameter_mm:.2f} mm)"


def finding_sections(result: StudyResult, figures: Mapping[str, list[Figure]]) -> str:
    """One block per screw, cage and level with its value, its images and its status."""
    out = ["<h2>Screws</h2>"]
    near = borderline_keys(result)
    for s in result.screws:
        key = finding_key("screw", s.id)
        figs = "".join(img_tag(f, f"screw {s.id}") for f in figures.get(key, []))
        excl = (f"<br>Rays used {s.rays_used}, excluded {s.rays_excluded}."
                if (s.rays_used or s.rays_excluded) else "")
        breach = breach_summary(s)
        if breach:
            breach = ("<br>" + (f'<span class="flag">{esc(breach)}</span>' if s.breach_grade not in ("A", "B")
                                else esc(breach)))
        mig = f"<br>Migration since prior: {fmt_mm(s.migration_mm)}." if s.migration_mm is not None else ""
        if s.halo_change_mm is not None:
            mig += f"<br>Halo change since prior: {fmt_mm(s.halo_change_mm)}."
        out.append(f'<div class="finding" id="{esc(key)}"><b>{esc(screw_summary(s))}</b> '
                   f"{_badge(result.status)}{borderline_badge(near, 'screw', s.id)}<br>Length "
                   f"{fmt_mm(s.length_mm)}, diameter "
                   f"{esc(diameter_summary(s))}.{breach}{excl}{mig}<br>{figs or '<i>no image</i>'}</div>")
    if not result.screws:
        out.append("<p>No screws found.</p>")
    out.append("<h2>Cages</h2>")
    for c in result.cages:
        key = finding_key("cage", c.id)
        figs = "".join(img_tag(f, f"cage {c.id}") for f in figures.get(key, []))
        chg = (f"<br>Change since prior: {fmt_mm(c.subsidence_change_mm)}."
               if c.subsidence_change_mm is not None else "")
        out.append(f'<div class="finding" id="{esc(key)}"><b>{esc(c.level or "?")}: '
                   f"{esc(cage_summary(c))}</b> {_badge(result.status)}"
                   f"{borderline_badge(near, 'cage', c.id)}{chg}<br>"
                   f"{figs or '<i>no image</i>'}</div>")
    if not result.cages:
        out.append("<p>No cages found.</p>")
    out.append("<h2>Levels: bridging bone</h2>")
    for lv in result.levels:
        key = finding_key("level", lv.level)
        figs = "".join(img_tag(f, f"level {lv.level}") for f in figures.get(key, []))
        align = alignment_summary(lv)
        out.append(f'<div class="finding" id="{esc(key)}"><b>{esc(lv.level)}: '
                   f"{esc(level_summary(lv))}</b> {_badge(result.status)}"
                   f"{borderline_badge(near, 'level', lv.level)}<br>"
                   f"{esc(align) + '.<br>' if align else ''}{figs or '<i>no image</i>'}</div>")
    out.append(fracture_section(result))
    return "".join(out)


def _plain_cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.2f}" if math.isfinite(v) else "–"
    if isinstance(v, (list, tuple)) and all(isinstance(x, (int, float)) for x in v):
        return ", ".join(_plain_cell(float(x)) for x in v)
    if isinstance(v, (dict, list, tuple)):
        return esc(v)
    return esc("–" if v is None else v)


def extras_section(result: StudyResult) -> str:
    """Optional sections other steps add to ``result.extras`` (comparison with a prior
    study, alignment, ...), shown generically: a list of records as a table, a mapping as
    key/value rows. Each is marked awaiting confirmation like every finding."""
    out = []
    for key, value in (result.extras or {}).items():
        if key in ("software_version",) or value in (None, {}, []):
            continue
        title = esc(key.replace("_", " ").capitalize())
        if isinstance(value, (list, tuple)) and value and all(isinstance(r, dict) for r in value):
            cols: list[str] = []
            for r in value:
                cols += [c for c in r if c not in cols]
            head = "".join(f"<th>{esc(c)}</th>" for c in cols)
            rows = "".join("<tr>" + "".join(f"<td>{_plain_cell(r.get(c))}</td>" for c in cols) + "</tr>"
                           for r in value)
            body = f"<table><tr>{head}</tr>{rows}</table>"
        elif isinstance(value, dict):
            body = "<table>" + "".join(f"<tr><th>{esc(k)}</th><td>{_plain_cell(v)}</td></tr>"
                                       for k, v in value.items()) + "</table>"
        else:
            body = f"<p>{_plain_cell(value)}</p>"
        out.append(f'<h2 id="extra-{esc(key)}">{title}</h2>{_badge(result.status)}{body}')
    return "".join(out)


def build_report_html(result: StudyResult, meta: Mapping, figures: Mapping[str, list[Figure]],
                      input_info: Mapping | None = None) -> str:
    """The whole page as one string.

    Parameters
    ----------
    result : StudyResult
    meta : mapping
        ``volume.meta`` (series description, selection reason, study date; identifiers in
        it are never shown).
    figures : mapping
        ``make_figures`` output.
    input_info : mapping, optional
        measurements.json's ``input`` block (UIDs, spacing), so the page shows the same.
    """
    state = ("DRAFT: every finding below is awaiting confirmation by a surgeon."
             if result.status != "confirmed" else "Confirmed by the reviewing surgeon.")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<title>fusionct report</title>"
        f"<style>{CSS}</style></head><body>"
        "<h1>Post-fusion CT: hardware and fusion measurements</h1>"
        f'<p class="state"><b>{esc(state)}</b></p>'
        f"{study_header(result, meta, input_info)}"
        f"<h2>What the analysis was unsure of</h2>{unsure_section(result)}"
        f"<h2>Per level</h2>{level_table(result)}"
        f"{finding_sections(result, figures)}"
        f"{extras_section(result)}"
        "<p><small>Halo: lucent zone measured perpendicular to the screw from its true radius; "
        "loosening when the halo is at least the threshold over the stated share of the "
        "intraosseous surface. Subsidence: from the intact endplate rim to the cage's deepest "
        "point along the endplate normal. Bridging: share of the disc cross-section with "
        "continuous bone from endplate to endplate.</small></p>"
        "</body></html>\n"
    )
