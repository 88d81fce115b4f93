#!/usr/bin/env bash
# Sanitizers over the GPU pipeline (issue #10); needs a CUDA device.
#   1. The GPU tests of the pipeline, the CUDA graphs and the OOM split under PyTorch's CUDA sanitizer
#      (TORCH_CUDA_SANITIZER=1), with a negative control the sanitizer must catch
#      (tests/actors/test_sanitizer.py), so that "no race" cannot mean "not running".
#   2. Short pipeline runs (scripts/pipeline_run.py) under compute-sanitizer's racecheck
#      (shared-memory hazards inside kernels), found on PATH or in /usr/local/cuda*/bin.
# Usage: bash scripts/gpu_sanitize.sh [DIR]   (default DIR: $OUT/sanitize, else out/sanitize)
# Writes DIR/csan_pytest.log, csan_junit.xml, racecheck_<case>.log, pipeline_run_<case>.json and
# summary.json; exits 0 only when every step ran and found nothing.
set -uo pipefail
cd "$(dirname "$0")/.."
dir=${1:-${OUT:+$OUT/sanitize}}
dir=${dir:-out/sanitize}
mkdir -p "$dir"
rm -f "$dir"/csan_* "$dir"/racecheck_* "$dir"/pipeline_run_* "$dir"/summary.json  # no stale results
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python=${PYTHON:-python3}

summarize() {  # summarize NOTE: write summary.json from what the steps left in $dir; print it; exit 0 if clean
    "$python" - "$dir" "$1" <<'PY'
import json, re, sys, xml.etree.ElementTree as ET
from pathlib import Path

d, note = Path(sys.argv[1]), sys.argv[2]
csan = {"ran": (d / "csan_junit.xml").exists()}
if csan["ran"]:
    cases = ET.parse(d / "csan_junit.xml").getroot().iter("testcase")
    failed, passed, skipped, control = [], 0, 0, False
    for case in cases:
        name = f"{case.get('classname')}::{case.get('name')}"
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            failed.append({"test": name, "race": "CSAN" in (bad.text or "") or "CUDASanitizerErrors" in (bad.text or ""),
                           "message": (bad.get("message") or "").splitlines()[0][:300] if bad.get("message") else ""})
        elif case.find("skipped") is not None:
            skipped += 1
        else:
            passed += 1
            control |= case.get("name") == "test_csan_catches_a_missing_stream_wait"
    csan.update(passed=passed, skipped=skipped, failed=failed, races=sum(f["race"] for f in failed),
                negative_control_caught=control)
    csan["ok"] = not failed and control and passed > 1
racecheck = {"tool": (d / "racecheck_tool.txt").read_text().strip() if (d / "racecheck_tool.txt").exists() else None,
             "cases": []}
for log in sorted(d.glob("racecheck_*.log")):
    text = log.read_text(errors="replace")
    hazards = re.search(r"RACECHECK SUMMARY: (\d+) hazard", text)
    # racecheck prints its error count inside its summary line: "0 hazards displayed (0 errors, 0 warnings)"
    errors = (re.search(r"ERROR SUMMARY: (\d+) error", text)
              or re.search(r"RACECHECK SUMMARY: \d+ hazards? displayed \((\d+) error", text))
    name = log.stem.removeprefix("racecheck_")
    run = d / f"pipeline_run_{name}.json"
    outputs_ok = json.loads(run.read_text())["ok"] if run.exists() else False
    rc_file = d / f"racecheck_{name}.rc"
    rc = int(rc_file.read_text()) if rc_file.exists() else None
    case = {"case": name, "rc": rc, "hazards": int(hazards.group(1)) if hazards else None,
            "errors": int(errors.group(1)) if errors else None, "outputs_ok": outputs_ok, "log": str(log)}
    case["ok"] = rc == 0 and case["hazards"] == 0 and case["errors"] == 0 and outputs_ok
    racecheck["cases"].append(case)
racecheck["ok"] = bool(racecheck["tool"]) and bool(racecheck["cases"]) and all(c["ok"] for c in racecheck["cases"])
summary = {"note": note, "csan": csan, "racecheck": racecheck, "ok": bool(csan.get("ok")) and racecheck["ok"]}
(d / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps(summary, indent=2))
sys.exit(0 if summary["ok"] else 1)
PY
}

if ! "$python" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_sanitize: torch sees no CUDA device; the sanitizers need one" >&2
    summarize "no CUDA device: nothing was sanitized"
    exit 2
fi

echo "== 1/2 pipeline, graph and OOM-split GPU tests under TORCH_CUDA_SANITIZER=1 -> $dir/csan_pytest.log" >&2
# Left out: two tests of timing (how fast the host enqueues; where H2D falls against compute in a
# timeline), which the sanitizer's per-launch bookkeeping on the host changes.
TORCH_CUDA_SANITIZER=1 ORCH_GPU_TESTS=1 timeout 240 "$python" -m pytest -m gpu -p no:cacheprovider -q \
    tests/actors/test_pipeline.py tests/actors/test_graphs.py tests/actors/test_oom.py tests/actors/test_sanitizer.py \
    --deselect tests/actors/test_graphs.py::test_replay_path_never_waits_on_the_device \
    --deselect tests/actors/test_pipeline.py::test_cuda_timeline_shows_h2d_overlapping_compute \
    --junitxml="$dir/csan_junit.xml" >"$dir/csan_pytest.log" 2>&1
echo "   pytest exit code $?" >&2

echo "== 2/2 pipeline runs under compute-sanitizer --tool racecheck" >&2
tool=${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || ls -d /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | sort -V | tail -n 1)}
if [ -z "$tool" ] || [ ! -x "$tool" ]; then
    echo "gpu_sanitize: compute-sanitizer is absent (not on PATH, not in /usr/local/cuda*/bin); install the CUDA" \
         "toolkit's compute-sanitizer or set COMPUTE_SANITIZER=/path/to/it. racecheck did NOT run." >&2
    rm -f "$dir/racecheck_tool.txt"
else
    echo "$tool" >"$dir/racecheck_tool.txt"
    # case name, time limit (s), scripts/pipeline_run.py arguments: GEMMs eager and graphed, then convolutions.
    # racecheck slows shared-memory kernels by 10-100x, so the runs are a handful of batches; all the
    # limits together (240 + 90 + 200 s) keep the script under 10 minutes.
    while read -r name limit args; do
        echo "   $name: $args (at most $limit s)" >&2
        # shellcheck disable=SC2086  # $args is a list of arguments
        timeout "$limit" "$tool" --tool racecheck --racecheck-report all --error-exitcode 1 --print-limit 100 \
            --log-file "$dir/racecheck_$name.log" \
            "$python" scripts/pipeline_run.py $args --out "$dir/pipeline_run_$name.json" >&2
        echo $? >"$dir/racecheck_$name.rc"
    done <<'CASES'
tiny_mlp 90 --model zoo:tiny_mlp --batches 4 --rows 32 --graphs
resnet18 200 --model zoo:resnet18 --batches 1 --rows 1
CASES
fi
summarize "TORCH_CUDA_SANITIZER over the GPU tests; compute-sanitizer racecheck over short pipeline runs"
