"""Prefect behaviour of the analysis flow on small phantom studies (one session harness):
a re-run is served from cache, a changed input is not, a transient fault is retried, bad
input is not, and two studies run at once without clobbering each other."""
from __future__ import annotations

import json
import shutil
import threading

import pytest

pytestmark = [pytest.mark.usefixtures("prefect_harness")]


def _pipeline_ready() -> str | None:
    try:
        from sample_data import PhantomSpec, write_dicom_study  # noqa: F401
        import pipeline.detect, pipeline.measure, pipeline.outputs  # noqa: F401,E401
    except Exception as exc:  # noqa: BLE001
        return f"pipeline pieces not importable yet ({exc})"
    return None


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    """Two small DICOM phantoms: A instruments L5-S1 (4 screws), B L4-L5 and L5-S1 (6 screws)."""
    reason = _pipeline_ready()
    if reason:
        pytest.skip(reason)
    from sample_data import PhantomSpec, write_dicom_study

    root = tmp_path_factory.mktemp("flow_studies")
    specs = {"A": PhantomSpec(seed=11, spacing_mm=(0.8, 0.8, 1.5), vertebrae=("L4", "L5", "S1"),
                              instrumented_levels=("L5-S1",)),
             "B": PhantomSpec(seed=12, spacing_mm=(0.8, 0.8, 1.5), vertebrae=("L4", "L5", "S1"),
                              instrumented_levels=("L4-L5", "L5-S1"))}
    out = {}
    for name, spec in specs.items():
        write_dicom_study(spec, root / name, extra_series=False)
        truth = json.loads((root / name / "truth.json").read_text())
        out[name] = (root / name, truth)
    return out


def task_runs(state) -> dict[str, tuple[str, int]]:
    """Task run name -> (state name, run count) for the flow run behind ``state``."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])),
            limit=200, sort=TaskRunSort.EXPECTED_START_TIME_DESC)
    return {r.name: (r.state.name, r.run_count) for r in runs}


def _by_kind(runs: dict, prefix: str) -> dict:
    return {k: v for k, v in runs.items() if k.startswith(prefix)}


class Counter:
    """Wraps a pipeline function and counts its calls (the wrapped function still runs)."""

    def __init__(self, fn, fail_first_with: BaseException | None = None):
        self.fn, self.calls, self.fail = fn, 0, fail_first_with
        self.lock = threading.Lock()

    def __call__(self, *a, **k):
        with self.lock:
            self.calls += 1
            first = self.calls == 1
        if first and self.fail is not None:
            raise self.fail
        return self.fn(*a, **k)


def test_rerun_of_an_unchanged_study_is_served_from_cache(studies, tmp_path, monkeypatch):
    import pipeline.detect
    import pipeline.loading
    import pipeline.measure
    from flows.analyze import analyze_flow

    study, truth = studies["A"]
    first = analyze_flow(str(study), str(tmp_path / "first"), return_state=True)
    assert first.is_completed(), first.message
    runs1 = task_runs(first)
    a = json.loads((tmp_path / "first" / "measurements.json").read_text())
    # one task run per screw and per level, named after it
    assert set(_by_kind(runs1, "measure-screw-")) == {f"measure-screw-{s['id']}" for s in a["screws"]}
    assert set(_by_kind(runs1, "measure-level-")) == {f"measure-level-{lv['level']}" for lv in a["levels"]}

    load, detect = Counter(pipeline.loading.load_study), Counter(pipeline.detect.detect)
    screw = Counter(pipeline.measure.measure_screw)
    monkeypatch.setattr(pipeline.loading, "load_study", load)
    monkeypatch.setattr(pipeline.detect, "detect", detect)
    monkeypatch.setattr(pipeline.measure, "measure_screw", screw)
    second = analyze_flow(str(study), str(tmp_path / "second"), return_state=True)
    assert second.is_completed(), second.message
    runs2 = task_runs(second)
    assert (load.calls, detect.calls, screw.calls) == (0, 0, 0)
    cached = {name for name, (st, _) in runs2.items() if st == "Cached"}
    expected = {n for n in runs2 if n.startswith(("load-study", "detect", "measure-"))}
    assert expected and expected <= cached
    b = json.loads((tmp_path / "second" / "measurements.json").read_text())
    assert a["screws"] == b["screws"] and a["levels"] == b["levels"]


def test_a_changed_input_misses_the_cache_and_a_transient_load_fault_is_retried(studies, tmp_path,
                                                                                monkeypatch):
    import pipeline.loading
    from flows.analyze import analyze_flow

    study, truth = studies["A"]
    changed = tmp_path / "changed"
    shutil.copytree(study, changed)
    (changed / "README.txt").write_text("one more file: a different fingerprint\n")
    flaky = Counter(pipeline.loading.load_study, fail_first_with=OSError(116, "Stale file handle"))
    monkeypatch.setattr(pipeline.loading, "load_study", flaky)

    state = analyze_flow(str(changed), str(tmp_path / "out"), return_state=True)
    assert state.is_completed(), state.message
    runs = task_runs(state)
    load_state, load_count = next(v for k, v in runs.items() if k.startswith("load-study"))
    assert flaky.calls == 2 and load_count == 2 and load_state == "Completed"  # failed once, retried
    assert all(st != "Cached" for k, (st, _) in runs.items() if k.startswith(("load-study", "detect")))
    doc = json.loads((tmp_path / "out" / "measurements.json").read_text())
    assert doc["input"]["study_instance_uid"] == truth["dicom"]["study_instance_uid"]


def test_bad_input_is_not_retried_and_leaves_no_result(tmp_path, monkeypatch):
    reason = _pipeline_ready()
    if reason:
        pytest.skip(reason)
    import pipeline.loading
    from flows.analyze import analyze_flow

    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "scan.txt").write_text("not a CT\n")
    counter = Counter(pipeline.loading.load_study)
    monkeypatch.setattr(pipeline.loading, "load_study", counter)
    state = analyze_flow(str(junk), str(tmp_path / "out"), return_state=True)
    assert state.is_failed()
    assert counter.calls == 1
    assert not (tmp_path / "out" / "measurements.json").exists()


def test_two_studies_at_once_each_get_their_own_complete_result(studies, tmp_path):
    from flows.analyze import analyze_flow

    results, errors = {}, []

    def run(name):
        try:
            study, _ = studies[name]
            results[name] = analyze_flow(str(study), str(tmp_path / name))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in ("A", "B")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    for name in ("A", "B"):
        _, truth = studies[name]
        doc = json.loads((tmp_path / name / "measurements.json").read_text())
        assert doc["input"]["study_instance_uid"] == truth["dicom"]["study_instance_uid"]
        assert doc["input"]["series_instance_uid"] == truth["dicom"]["bone_series_uid"]
