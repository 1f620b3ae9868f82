#!/usr/bin/env bash
# Mutation testing, one module at a time, with mutmut 3 (docs/TESTING.md has the scores and what survives).
#
#   scripts/mutation.sh <module>                  mutate the module's files, run only its tests against each mutant
#   scripts/mutation.sh <module> --fresh          the same, forgetting cached verdicts (after changing tests)
#   scripts/mutation.sh <module> --survivors      re-test only the mutants not killed last time (after a new test)
#   scripts/mutation.sh <module> <mutant>...      re-test just these mutants
#   scripts/mutation.sh <module> results          per-file counts and every mutant not killed
#   scripts/mutation.sh <module> show <mutant>    the diff of one mutant
#   scripts/mutation.sh list                      the modules, their files and test selections
#
# Each module runs in its own snapshot of the working tree under .mutation/<module>/ (git-ignored): mutmut
# writes its mutants there, never into the checkout, and a module's cached verdicts survive other modules' runs.
# The [tool.mutmut] settings in pyproject.toml are used as they are, except that only_mutate and the test
# selection are replaced by the module's, below. Every run is bounded by `timeout` (MUTATION_TIMEOUT seconds,
# else the module's default); --max-children N passes through to mutmut (default: one per CPU).
# MUTATION_TIMEOUT_MULTIPLIER=N stops a hanging mutant after about N times its tests' time (mutmut's default 15;
# its estimates come from a run with tf.functions eager, so a low N turns compiling survivors into false timeouts).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY="$REPO/.venv/bin/python"

# module | files to mutate | pytest selection (a bash array's words) | default timeout (s)
# Selections leave out tests that train, serve or import in a subprocess (a subprocess reports no coverage to
# mutmut, so it is never run against a mutant anyway, and costs seconds to minutes of stats), and end-to-end
# tests that repeat what faster ones check (the ensemble's `identical_seeds` runs every method's CV twice).
module_spec() {
  case "$1" in
    ensemble)  # blend methods and their K-fold CV
      FILES=(ensemble/blend.py ensemble/validation.py)
      TESTS=(tests/test_ensemble.py -k "not without_tensorflow and not identical_seeds")
      LIMIT=1800 ;;
    fit)  # checkpoint save/restore and the epoch loop
      FILES=(training/fit/loop.py training/fit/checkpoints.py)
      TESTS=(tests/test_checkpoints.py tests/test_epoch_loop.py tests/test_resume.py tests/test_run.py
             tests/test_distributed.py
             -k "test_checkpoints or test_epoch_loop or checkpoint_restores or kill_while or every_epoch_sees or focal_loss or class_weights_count or replica_setting or config_changes_name or temporary_name or single_folder_layout or resume_on_another")
      LIMIT=3600 ;;
    export)  # SavedModel export and the prediction files
      FILES=(training/fit/export.py)
      # (tests/test_config.py: `tta_` has always selected its predict.tta_seed range check, by the parameter's id)
      TESTS=(tests/test_tta.py tests/test_run.py tests/test_config.py tests/test_pixel_parity.py -k "tta_ or predict_split or saved_models_bytes_signature_agrees or every_format or prediction_files_hold or second_export")
      LIMIT=3600 ;;
    geometry)  # a photo to the model's square: fit modes, antialiased resize, the record size
      FILES=(imaging/geometry.py)
      TESTS=(tests/test_geometry.py)  # against PIL directly; tests/test_pixel_parity.py rebuilds photos and SavedModels per mutant
      LIMIT=3600 ;;
    service)  # decoding, resizing, batching, result assembly
      FILES=(service/images.py service/predictor.py service/batching.py service/inference.py service/routes/predict.py)
      TESTS=(tests/test_batching.py tests/test_inference.py tests/test_service.py tests/test_service_overload.py tests/test_service_refusals.py tests/test_page_info.py
             tests/test_member_concurrency.py tests/test_pixel_parity.py
             -k "not concurrent_requests_are_batched and not stays_responsive and not command_refuses and not workers and not python_m_service and not 300_mb and not gigabyte and not byte_by_byte and not bounded_memory and not trickles")
      LIMIT=3600 ;;
    batching)  # the dynamic batcher alone: its own tests and the overload tests with a stand-in model, so a mutant
      # that makes the batch loop spin is stopped after seconds (in the `service` selection it ran minutes)
      FILES=(service/batching.py)
      TESTS=(tests/test_batching.py tests/test_service_overload.py
             -k "test_batching or past_max_queue or past_its_deadline or batching_off_max_queue")
      LIMIT=3600 ;;
    decoding)  # the service's decoding, reduction and squares: the image tests only, so a survivor costs seconds
      # (tests/test_pixel_parity.py is left out: it rebuilds photos and SavedModels in every mutant's process)
      FILES=(service/images.py service/predictor.py)
      TESTS=(tests/test_image_decoding.py tests/test_member_inputs.py tests/test_service.py tests/test_service_refusals.py
             tests/test_member_concurrency.py
             -k "test_image_decoding or test_member_inputs or becomes_rgb or first_frame or exif or bad_images_are_named or plain_jpeg or alpha_cmyk or member_votes or 16_bit or no_reduction or reduced or budget or header_count or test_member_concurrency")
      LIMIT=3600 ;;
    serving)  # the model repository and the Open Inference Protocol routes
      FILES=(service/repository.py service/routes/v2.py service/routes/tfserving.py)
      TESTS=(tests/test_model_repository.py tests/test_open_inference.py -k "not hot_reload and not tritonclient")
      LIMIT=3600 ;;
    augment)  # augmentation geometry and colour
      FILES=(imaging/augment.py)
      TESTS=(tests/test_augment.py -k "not grid_command")
      LIMIT=3600 ;;
    import)  # the import tool: decoding, squaring, the stratified split
      FILES=(training/data/importer/*.py training/data/near_duplicates.py)
      TESTS=(tests/test_import_and_demo.py tests/test_near_duplicates.py -k "not demo_data")
      LIMIT=1800 ;;
    core)  # the ground floor: the contract's rules, member.json and ensemble.json, files, photos
      FILES=(core/contract.py core/members.py core/files.py core/photos.py)
      TESTS=(tests/test_core.py tests/test_geometry.py tests/test_image_decoding.py -k "test_core or member or fit")
      LIMIT=1800 ;;
    *) return 1 ;;
  esac
}
MODULES=(ensemble fit export geometry service batching decoding serving augment import core)

usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; echo "modules: ${MODULES[*]}"; exit 2; }
[ $# -ge 1 ] || usage
if [ "$1" = list ]; then
  for m in "${MODULES[@]}"; do
    module_spec "$m"
    printf '%-9s %s\n          pytest %s\n' "$m" "${FILES[*]}" "$(printf '%q ' "${TESTS[@]}")"
  done
  exit 0
fi
MODULE=$1; shift
module_spec "$MODULE" || usage
WORK="$REPO/.mutation/$MODULE"
# CPU only (unless CUDA_VISIBLE_DEVICES is set): one test process per core must not share a GPU.
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}" CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES-}"
# mutmut runs one test process per core; BLAS threads on top of that make the ensemble's tests several times slower.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" OPENBLAS_NUM_THREADS="${OPENBLAS_NUM_THREADS:-1}"
# Every mutant's test process is forked from one that imported TensorFlow (tests/conftest.py): ~5 s less per mutant.
export FLOWER_PRELOAD_TENSORFLOW="${FLOWER_PRELOAD_TENSORFLOW:-1}"
mutmut() { (cd "$WORK" && timeout -k 30 "${MUTATION_TIMEOUT:-$LIMIT}" "$REPO/.venv/bin/mutmut" "$@"); }

summary() {  # per-file counts from mutmut's verdicts, then every mutant that was not killed
  mutmut results --all true | "$PY" -c '
import collections, re, sys
rows = [line.strip().rsplit(": ", 1) for line in sys.stdin if ": " in line]
by_file = collections.defaultdict(collections.Counter)
for name, status in rows:
    by_file[re.split(r"\.x(?:_|\u01c1)", name, maxsplit=1)[0]][status] += 1
for module, counts in sorted(by_file.items()):
    total, killed = sum(counts.values()), counts["killed"]
    other = "".join(f", {n} {s}" for s, n in sorted(counts.items()) if s != "killed")
    print(f"{module}: {killed}/{total} killed ({100 * killed / total:.1f}%){other}")
for name, status in rows:
    if status != "killed":
        print(f"    {status:>10}  {name}")
'
}

case "${1:-}" in
  results) summary; exit 0 ;;
  show) shift; mutmut show "$@"; exit 0 ;;
  browse) mutmut browse; exit 0 ;;
esac

FRESH=0
if [ "${1:-}" = --fresh ]; then FRESH=1; shift; fi
if [ "${1:-}" = --survivors ]; then  # re-test every mutant not killed last time (e.g. after adding tests)
  shift
  mapfile -t survivors < <(mutmut results | sed -n 's/^ *\([^ :]*__mutmut_[0-9]*\): .*/\1/p')
  [ ${#survivors[@]} -gt 0 ] || { echo "mutation.sh: $MODULE: no survivors to re-test"; exit 0; }
  set -- "$@" "${survivors[@]}"
fi

# Snapshot the working tree (tracked and untracked-but-not-ignored files, with their mtimes, so mutmut only
# regenerates the mutants of files that changed) and write the module's pyproject.toml.
"$PY" - "$WORK" "$FRESH" "${#FILES[@]}" "${FILES[@]}" "${TESTS[@]}" <<'EOF'
import json, os, re, shutil, subprocess, sys, tomllib
from pathlib import Path

work, fresh, count = Path(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3])
files, tests = sys.argv[4:4 + count], sys.argv[4 + count:]
present = [f for f in files if Path(f).is_file()]
for f in sorted(set(files) - set(present)):
    print(f"mutation.sh: {f} does not exist; skipped", file=sys.stderr)
if not present:
    sys.exit("mutation.sh: none of the module's files exist")
if fresh:
    shutil.rmtree(work, ignore_errors=True)
work.mkdir(parents=True, exist_ok=True)
for entry in work.iterdir():  # a fresh snapshot, keeping mutmut's own folder (its cache)
    if entry.name != "mutants":
        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                        capture_output=True, check=True).stdout.decode().split("\0")
for name in listed:
    source = Path(name)
    if name and source.is_file() and not name.startswith(".schemathesis/"):
        (work / source).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, work / source)

text = Path("pyproject.toml").read_text()
settings = tomllib.loads(text).get("tool", {}).get("mutmut", {})
settings.update(only_mutate=present, pytest_add_cli_args_test_selection=tests)
if os.environ.get("MUTATION_TIMEOUT_MULTIPLIER"):  # a mutant that hangs is stopped after this many times its tests' time
    settings["timeout_multiplier"] = float(os.environ["MUTATION_TIMEOUT_MULTIPLIER"])
text = re.sub(r"(?ms)^\[tool\.mutmut\]\n.*?(?=^\[|\Z)", "", text)
text += "\n[tool.mutmut]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in settings.items())
(work / "pyproject.toml").write_text(text)
EOF

echo "mutation.sh: $MODULE: mutating ${FILES[*]}; tests: $(printf '%q ' "${TESTS[@]}")(limit ${MUTATION_TIMEOUT:-$LIMIT} s)"
start=$SECONDS
status=0
mutmut run "$@" || status=$?
echo "mutation.sh: $MODULE: mutmut exited $status after $((SECONDS - start)) s"
summary
exit "$status"
