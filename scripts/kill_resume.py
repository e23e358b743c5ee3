"""kill -9 the smoke pipeline at random moments, rerun it, and check that the rerun ends where an uninterrupted run does.

    python scripts/kill_resume.py --trials 20 --seed 0 --out /tmp/kill_resume
    python scripts/kill_resume.py --quick            # 3 trials

One uninterrupted run is the reference (kept in OUT/reference and reused by later invocations). Each trial starts
the same command in a fresh run directory, SIGKILLs its whole process group at a drawn moment, reruns the command
to completion and compares the run directory with the reference. The moments are drawn per stage: the stages are
dealt out in a seeded random order (every stage is hit once before any is hit twice), and the kill comes a uniform
fraction of that stage's expected duration after the stage shows up as running in the manifest, or as soon as the
stage is over if that comes first. Expected: the reference's duration scaled by how fast this trial ran the stages
before (a shared machine's load changes stage times several-fold). The stage the kill actually landed in is read
from the manifest afterwards (tiny stages such as `split` are often over before the kill comes). Finished trials
are kept in OUT/trial-NN/result.json, so an interrupted invocation continues.

What is compared, file by file (every file of either run directory):
* byte for byte after one normalization: the run directory's path is replaced by a placeholder (it is written
  into manifests, summaries and eval records), and in JSON / JSONL these timing or per-invocation fields are
  dropped wherever they occur: TIMING_FIELDS below. Everything else (data/*.jsonl, filter_stats, eval summaries
  and episodes, train_summary numbers, train_log, tokenizers, configs, manifest keys/outputs/info) must match.
* binary files (model weights, optimizer, scheduler and RNG states of checkpoints) by sha256.
* left out, with the reason: report/ (report.md and report.html print stage timings; every number in them comes
  from files compared here), checkpoints' training_args.bin (a pickle of the trainer arguments, holding the run
  directory's path), checkpoints/README.md (TRL's model card: it lists its tags in the order of a Python set,
  which differs between any two processes), and the manifest's stage keys and output digests (they hash the
  stages' files, which hold the run directory's path and timing fields; the files themselves are compared).
A JSONL file whose records are the same but in another order is reported as "order", not as identical: record
order feeds training (dr.jsonl) and is part of what a rerun must reproduce.

A process is the run's if its environment carries this trial's marker (children inherit it, whatever process
group or session they move to); any such process still alive 2 s after the kill or after the rerun is reported
(java ones by name: TextWorldExpress's JVM) and then killed by its pid.

The last line printed is one JSON line: {"trials": N, "rc0": ..., "identical": ..., "leftover_processes": ...}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

MARKER = "STEPTUNE_KILL_RESUME"
TIMING_FIELDS = {
    "seconds", "started", "total_seconds",  # manifest and train_summary wall times
    "resumed_from",  # train_summary: which checkpoint this call resumed from (None in an uninterrupted run)
    "train_runtime", "train_samples_per_second", "train_steps_per_second",  # transformers' speed metrics
}
SKIPPED = {"report": "prints stage timings; its numbers come from the files compared",
           "training_args.bin": "pickled trainer arguments holding the run directory's path",
           "checkpoints/README.md": "TRL's model card, tags in set order"}
MANIFEST_DIGESTS = {"key", "outputs"}  # hashes of files holding the run directory's path and timings
BINARY = {".safetensors", ".pt", ".pth", ".bin", ".png"}


def command(preset: str, run_dir: Path) -> list[str]:
    # the steptune that this interpreter imports (PYTHONPATH included), not whichever `steptune` is on PATH
    return [sys.executable, "-c", "from steptune.cli import main; main()", "quickstart", "--preset", preset,
            "-o", str(run_dir)]


def start(preset: str, run_dir: Path, token: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, MARKER: token, "PYTHONUNBUFFERED": "1"}
    with log.open("ab") as fh:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(command(preset, run_dir), stdout=fh, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)


def stages_state(run_dir: Path) -> dict[str, dict]:
    try:
        return json.loads((run_dir / "manifest.json").read_text())["stages"]
    except (OSError, ValueError, KeyError):
        return {}  # not written yet (the manifest is replaced atomically, so never half-written)


def running_stage(run_dir: Path) -> str:
    stages = stages_state(run_dir)
    running = [name for name, rec in stages.items() if rec.get("status") == "running"]
    if running:
        return running[0]
    done = [name for name, rec in stages.items() if rec.get("status") == "done"]
    return f"after {done[-1]}" if done else "startup"


def marked_processes(token: str) -> list[tuple[int, str]]:
    """(pid, command name) of every live process whose environment carries this token."""
    needle = f"{MARKER}={token}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if needle in (proc / "environ").read_bytes().split(b"\0"):
                found.append((int(proc.name), (proc / "comm").read_text().strip()))
        except OSError:
            continue  # gone meanwhile, or not ours
    return found


def reap(token: str) -> list[str]:
    """Report and kill (by pid) the processes a run left behind."""
    time.sleep(2)  # let the kernel reparent and the dying ones exit
    left = [(pid, name) for pid, name in marked_processes(token) if pid != os.getpid()]
    for pid, _ in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return [f"{name}:{pid}" for pid, name in left]


# reference ---------------------------------------------------------------------------------------------------
def reference(out: Path, preset: str, adopt: Path | None) -> dict:
    """The uninterrupted run (`adopt`: one already made with the same preset and code) and its stage durations."""
    meta = out / "reference.json"
    if meta.exists():
        return json.loads(meta.read_text())
    leftover: list[str] = []
    if adopt is None:
        adopt = out / "reference" / "run"
        shutil.rmtree(adopt.parent, ignore_errors=True)
        adopt.parent.mkdir(parents=True)
        token = uuid.uuid4().hex
        rc = start(preset, adopt, token, adopt.parent / "log.txt").wait()
        leftover = reap(token)
        if rc != 0:
            sys.exit(f"the reference run failed (rc {rc}); see {adopt.parent / 'log.txt'}")
    manifest = json.loads((adopt / "manifest.json").read_text())
    if any(rec.get("status") != "done" for rec in manifest["stages"].values()) or "report" not in manifest["stages"]:
        sys.exit(f"{adopt} is not a finished run")
    result = {"run_dir": str(adopt.resolve()), "seconds": manifest["total_seconds"], "leftover": leftover,
              "headline": headline(adopt), "stages": {k: rec["seconds"] for k, rec in manifest["stages"].items()}}
    meta.write_text(json.dumps(result, indent=2))
    return result


def headline(run_dir: Path) -> str:
    """The last line `steptune quickstart` prints."""
    from steptune.pipeline.report import headline

    return json.dumps(headline(run_dir))


def last_line(log: Path) -> str:
    lines = log.read_text(errors="replace").strip().splitlines()
    return lines[-1] if lines else ""


# comparison --------------------------------------------------------------------------------------------------
def skipped(rel: Path) -> bool:
    return rel.parts[0] in SKIPPED or rel.name in SKIPPED or "/".join(rel.parts[-2:]) in SKIPPED


def drop_timing(obj, fields=TIMING_FIELDS):
    if isinstance(obj, dict):
        return {k: drop_timing(v, fields) for k, v in obj.items() if k not in fields}
    if isinstance(obj, list):
        return [drop_timing(v, fields) for v in obj]
    return obj


def canonical(path: Path, run_dir: Path):
    """What must match: a digest for binary files, the normalized content for text."""
    if path.suffix in BINARY:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    text = path.read_text(errors="replace").replace(str(run_dir.resolve()), "<RUN>")
    try:
        if path.name == "manifest.json":
            return drop_timing(json.loads(text), TIMING_FIELDS | MANIFEST_DIGESTS)
        if path.suffix == ".json":
            return drop_timing(json.loads(text))
        if path.suffix == ".jsonl":
            return [drop_timing(json.loads(line)) for line in text.splitlines() if line.strip()]
    except ValueError:
        return text  # a half-written file: compared as text, so it differs
    return text


def compare(ref_dir: Path, run_dir: Path) -> dict[str, str]:
    """{relative path: how it differs} for every file that does not match the reference."""
    def files(root: Path) -> set[Path]:
        return {p.relative_to(root) for p in root.rglob("*") if p.is_file() and not skipped(p.relative_to(root))}

    ref, got = files(ref_dir), files(run_dir)
    diffs = {str(p): "missing" for p in ref - got} | {str(p): "extra" for p in got - ref}
    for rel in sorted(ref & got):
        a, b = canonical(ref_dir / rel, ref_dir), canonical(run_dir / rel, run_dir)
        if a == b:
            continue
        same_records = isinstance(a, list) and isinstance(b, list) and sorted(map(json.dumps, a)) == sorted(
            map(json.dumps, b))
        diffs[str(rel)] = "order" if same_records else "content"
    return dict(sorted(diffs.items()))


# trials ------------------------------------------------------------------------------------------------------
def schedule(ref: dict, trials: int, seed: int) -> list[tuple[str, float]]:
    """(stage, fraction of its reference duration) per trial; every stage once before any twice."""
    rng = random.Random(seed)
    names = list(ref["stages"])
    order: list[str] = []
    while len(order) < trials:
        order += rng.sample(names, len(names))
    return [(name, rng.random()) for name in order[:trials]]


def pace(ref: dict, stages: dict[str, dict]) -> float:
    """How long this run took for the stages it has finished, relative to the reference."""
    done = [k for k, rec in stages.items() if rec.get("status") == "done" and ref["stages"].get(k)]
    took, ref_took = sum(stages[k]["seconds"] for k in done), sum(ref["stages"][k] for k in done)
    return took / ref_took if took and ref_took else 1.0


def trial(out: Path, ref: dict, preset: str, index: int, target: str, fraction: float, keep: bool) -> dict:
    tdir = out / f"trial-{index:02d}"
    result_path = tdir / "result.json"
    if result_path.exists():
        done = json.loads(result_path.read_text())
        if (done["target"], done["fraction"]) == (target, round(fraction, 3)):
            return done  # from an earlier invocation with the same seed
    shutil.rmtree(tdir, ignore_errors=True)
    tdir.mkdir(parents=True)
    run_dir, log = tdir / "run", tdir / "log.txt"
    token = uuid.uuid4().hex
    t0 = time.monotonic()
    proc = start(preset, run_dir, token, log)
    fire_at = None
    while proc.poll() is None:
        stages = stages_state(run_dir)
        state = stages.get(target, {})
        if fire_at is None and state:
            fire_at = time.monotonic() + fraction * ref["stages"][target] * pace(ref, stages)
        if fire_at is not None and (time.monotonic() >= fire_at or state.get("status") == "done"):
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    killed = proc.returncode == -signal.SIGKILL
    kill_s = round(time.monotonic() - t0, 1)
    killed_in = running_stage(run_dir) if killed else f"not killed (rc {proc.returncode})"
    after_kill = reap(token)
    t1 = time.monotonic()
    proc = start(preset, run_dir, token, log)
    try:
        rc = proc.wait(timeout=max(900, 4 * ref["seconds"]))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        rc = "timeout"
    rerun_s = round(time.monotonic() - t1, 1)
    after_rerun = reap(token)
    diffs = compare(Path(ref["run_dir"]), run_dir) if rc == 0 else {}
    headline_same = last_line(log) == ref["headline"]
    result = {"trial": index, "target": target, "fraction": round(fraction, 3), "kill_s": kill_s,
              "killed_in": killed_in, "rc": rc, "rerun_s": rerun_s, "left_after_kill": after_kill,
              "left_after_rerun": after_rerun, "headline_same": headline_same, "differs": diffs,
              "identical": rc == 0 and not diffs and headline_same}
    result_path.write_text(json.dumps(result, indent=2))
    if result["identical"] and not keep:
        shutil.rmtree(run_dir)  # ~10 MB a run; the differing ones stay for inspection
    return result


def table(results: list[dict]) -> str:
    rows = ["| # | target | kill at | killed in | rerun rc | rerun s | left behind (kill / rerun) | identical | differs |",
            "|---:|---|---:|---|---:|---:|---|---|---|"]
    for r in results:
        differs = ", ".join(f"{p} ({how})" for p, how in r["differs"].items()) or ("headline" if not
                                                                                   r["headline_same"] else "")
        left = f"{' '.join(r['left_after_kill']) or '–'} / {' '.join(r['left_after_rerun']) or '–'}"
        rows.append(f"| {r['trial']} | {r['target']} | {r['kill_s']} s | {r['killed_in']} | {r['rc']} | "
                    f"{r['rerun_s']} | {left} | {'yes' if r['identical'] else 'no'} | {differs} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("/tmp/kill_resume"))
    ap.add_argument("--preset", default="smoke")
    ap.add_argument("--quick", action="store_true", help="3 trials")
    ap.add_argument("--reference", type=Path, help="adopt this finished run (same preset and code) as the reference")
    ap.add_argument("--keep", action="store_true", help="keep the run directories of identical trials too")
    args = ap.parse_args()
    trials = 3 if args.quick else args.trials
    args.out.mkdir(parents=True, exist_ok=True)
    ref = reference(args.out, args.preset, args.reference)
    print(f"reference: {ref['seconds']} s, {len(ref['stages'])} stages, left behind: {ref['leftover'] or 'nothing'}",
          flush=True)
    results = []
    for i, (target, fraction) in enumerate(schedule(ref, trials, args.seed)):
        r = trial(args.out, ref, args.preset, i, target, fraction, args.keep)
        results.append(r)
        print(f"trial {i}: kill in {r['killed_in']} at {r['kill_s']} s, rerun rc {r['rc']}, "
              f"identical {r['identical']}, differs {list(r['differs']) or '-'}", flush=True)
    print(table(results))
    print(json.dumps({"trials": len(results), "rc0": sum(r["rc"] == 0 for r in results),
                      "identical": sum(r["identical"] for r in results),
                      "leftover_processes": sum(bool(r["left_after_kill"] or r["left_after_rerun"]) for r in results)}))


if __name__ == "__main__":
    main()
