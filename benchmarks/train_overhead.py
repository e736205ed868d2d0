"""Training overhead: `rayllm train` (Ray Train + DeepSpeed ZeRO-2) against the same model and
DeepSpeed config under DeepSpeed's own launcher, side by side.

    .venv/bin/python benchmarks/train_overhead.py                 # 80 steps, 2 rounds (~10 min)
    .venv/bin/python benchmarks/train_overhead.py --quick         # 12 steps, 1 round

Both sides train a 4-layer d=256 Llama (ModelConfig `dtype: auto`: bf16 only where the CPU has it,
else fp32) on one prepared dataset (seq_len 256, the test fixture corpus and BPE), 2 ranks ×
micro-batch 4, ZeRO-2, gloo, one torch thread per rank.
  rayllm:   `python -m rayllm train CONFIG` in a subprocess, exactly as a user runs it: preflight,
            a private local Ray, a TorchTrainer of 2 workers × 0.5 CPU, rayllm's loop with its
            metrics.jsonl every `logging_steps` (10). Its Ray workers run at niceness 0, like the
            baseline processes (rayllm.ray_session sets that for a Ray it starts).
  baseline: benchmarks/_ds_baseline.py under `deepspeed --num_accelerators 2` (no Ray): the same
            RunSpec the rayllm workers receive (pickled), hence the same model, seed, DeepSpeed
            config (rayllm.train.zero.deepspeed_config), data order and batch shape.
Measured: steady-state tokens/s on rank 0's wall clock from the end of step `--warmup` to the end of
the last step (rayllm: the `time` of those two records in metrics.jsonl; baseline: its own clock at
the same two points). Evaluation and checkpointing fall outside that window on both sides: rayllm
evaluates and saves once, after the last step (eval_every = save_every = steps), the baseline not at
all. Process wall time (start-up, Ray, DeepSpeed init, the final save/export) is printed beside it.

The machine may be shared, so every run is guarded (_quiet.py, shared by all benchmarks): it waits
(up to --wait-quiet s) for other jobs to go quiet, and the cores used in the timed window are
accounted: by the two ranks, by the side's other processes (Ray's daemons and actors, the launcher)
and by processes outside this benchmark's tree ("others"). Tokens per rank CPU-second is printed
too: it is blind to CPU taken by other processes, so it separates per-step work inside the ranks
from competition for the cores.
Sides alternate (baseline, rayllm, baseline, rayllm, ...) for `--repeats` rounds; the ratio is
rayllm / baseline of the medians over the clean rounds (others used at most 0.25 core in both
windows); with no clean round there is no ratio. Goal: ≥ 0.90.
"""

from __future__ import annotations

import argparse
import json
import pickle
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _quiet import WAIT_LIMIT, Figure, cpu_capability, note, ratio, sampler, wait_quiet

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PY = sys.executable
GOAL = 0.90


def machine() -> str:
    import deepspeed
    import ray
    import torch

    from rayllm.dtypes import resolve_dtype

    return (f"CPU capability {cpu_capability()}, dtype {resolve_dtype('auto', False)} (auto), {os.cpu_count()} cores; "
            f"torch {torch.__version__}, deepspeed {deepspeed.__version__}, ray {ray.__version__}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def setup(work: Path, steps: int, warmup: int):
    """The prepared dataset, the raw rayllm config, and the RunSpec its workers would receive."""
    from rayllm.config import parse_config
    from rayllm.train.spec import run_spec
    from rayllm.train.trainer import prepare_run
    from tests.ray.train_fixtures import make_dataset

    data = work / "data"
    if not (data / "manifest.json").exists():
        make_dataset(data, seq_len=256, n_docs=4000, val_docs=400)
    raw = {
        "model": {"hidden_size": 256, "num_layers": 4, "num_heads": 4, "max_position_embeddings": 256, "dtype": "auto"},
        "train": {"dataset": str(data), "output_dir": str(work / "runs"), "run_name": "probe", "num_workers": 2,
                  "cpus_per_worker": 0.5, "micro_batch_size": 4, "gradient_accumulation_steps": 1, "max_steps": steps,
                  "learning_rate": 1e-3, "warmup_steps": min(5, steps), "eval_every": steps, "save_every": steps,
                  "eval_batches": 2, "logging_steps": math.gcd(warmup, 10), "max_failures": 0, "zero_stage": 2},
    }
    cfg = parse_config(raw)
    pre, run_dir = prepare_run(cfg, dry=True)
    return raw, run_spec(cfg, pre, run_dir)


def run_logged(cmd: list[str], log: Path, env: dict, timeout: int):
    """Run `cmd` in its own process group with output to `log`, sampling the CPU of this benchmark's
    process tree (which holds `cmd` and everything it starts) and of the rest of the machine;
    (wall time, sampler). On timeout the group (only what this started) is ended."""
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        cpu = sampler()
        cpu.start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 15)
            proc.wait(30)
            raise RuntimeError(f"{cmd[:4]} timed out after {timeout} s; see {log}")
        finally:
            cpu.stop()
    if rc != 0:
        raise RuntimeError(f"{cmd[:4]} exited {rc}; see {log}")
    return time.perf_counter() - t0, cpu


def side_baseline(work: Path, run_spec, steps: int, warmup: int, i: int, timeout: int) -> dict:
    spec = work / f"baseline-{i}.pkl"
    out = work / f"baseline-{i}.result.json"
    spec.write_bytes(pickle.dumps({"spec": run_spec, "steps": steps, "warmup": warmup, "out": str(out)}))
    # The CPU accelerator counts NUMA nodes as devices unless LOCAL_SIZE says otherwise.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "LOCAL_SIZE": "2"}
    cmd = [str(Path(PY).parent / "deepspeed"), "--num_accelerators", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "benchmarks/_ds_baseline.py", "--spec", str(spec)]
    wall, cpu = run_logged(cmd, work / f"baseline-{i}.log", env, timeout)
    r = json.loads(out.read_text())
    return {**r, "wall_s": wall, "cpu": cpu.usage(r["t_start"], r["t_end"], ranks=2)}


def side_rayllm(work: Path, raw: dict, steps: int, warmup: int, tokens_per_step: int, i: int, timeout: int) -> dict:
    import yaml

    name = f"rayllm-{i}"
    cfg_path = work / f"{name}.yaml"
    cfg_path.write_text(yaml.safe_dump({**raw, "train": {**raw["train"], "run_name": name}}, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "OMP_NUM_THREADS")}
    wall, cpu = run_logged([PY, "-m", "rayllm", "train", str(cfg_path)], work / f"{name}.log", env, timeout)
    records = [json.loads(line) for line in (work / "runs" / name / "metrics.jsonl").read_text().splitlines() if line.strip()]
    start = next(r for r in records if r.get("event") == "start")
    at = {r["step"]: r for r in records if "tokens_per_s" in r}
    t0, t1 = at[warmup]["time"], at[steps]["time"]
    return {"tokens_per_s": (steps - warmup) * tokens_per_step / (t1 - t0), "seconds": t1 - t0, "dtype": start["dtype"],
            "world": start["world"], "loss_start": at[warmup]["loss"], "loss_end": at[steps]["loss"], "wall_s": wall,
            "cpu": cpu.usage(t0, t1, ranks=2)}


def main() -> int:
    ap = argparse.ArgumentParser(description="rayllm train (Ray Train + DeepSpeed ZeRO-2) tokens/s vs DeepSpeed's own launcher.")
    ap.add_argument("--steps", type=int, default=80, help="Optimizer steps per run (default 80).")
    ap.add_argument("--warmup", type=int, default=10, help="Steps left out of the timing (default 10).")
    ap.add_argument("--repeats", type=int, default=2, help="Rounds; each runs the baseline, then rayllm (default 2).")
    ap.add_argument("--quick", action="store_true", help="12 steps, 4 warm-up, 1 round: checks that it works.")
    ap.add_argument("--workdir", default=None, help="Keep dataset, configs, runs and logs here (default: a temp dir, removed).")
    ap.add_argument("--timeout", type=int, default=900, help="Seconds allowed per run (default 900).")
    ap.add_argument("--wait-quiet", type=float, default=WAIT_LIMIT, help="Before each run, wait up to this many seconds for "
                    f"other jobs on the machine to go quiet (default {WAIT_LIMIT:.0f}; 0: never wait).")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.warmup, args.repeats = 12, 4, 1
    if not 0 < args.warmup < args.steps:
        ap.error("need 0 < --warmup < --steps")

    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="rayllm-train-overhead-")
    work = Path(args.workdir or tmp.name).resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "rayllm" / "torch_extensions"))
    where = machine()
    cap = cpu_capability()
    print(f"[train_overhead] {where}")
    raw, spec = setup(work, args.steps, args.warmup)
    b = spec.batching
    tokens_per_step = b.tokens_per_step
    print(f"[train_overhead] 4-layer d=256 Llama, ZeRO-2, {b.num_workers} ranks × micro-batch {b.micro_batch_size} × "
          f"{b.seq_len} tokens = {tokens_per_step:,} tokens/step; timing steps {args.warmup + 1}..{args.steps}; work dir {work}")

    runs: dict[str, list[dict]] = {"baseline": [], "rayllm": []}
    figures: dict[str, list[Figure]] = {"baseline": [], "rayllm": []}
    try:
        for i in range(args.repeats):
            for side in ("baseline", "rayllm"):
                waited = wait_quiet(args.wait_quiet) if args.wait_quiet > 0 else 0.0
                if side == "baseline":
                    r = side_baseline(work, spec, args.steps, args.warmup, i, args.timeout)
                else:
                    r = side_rayllm(work, raw, args.steps, args.warmup, tokens_per_step, i, args.timeout)
                c = r["cpu"]
                r["per_rank_cpu_s"] = r["tokens_per_s"] / max(c["ranks"], 1e-9)
                runs[side].append(r)
                f = Figure(r["tokens_per_s"], c["others"], waited, c["others_top"], steal=c.get("steal", 0.0))
                figures[side].append(f)
                top = ", ".join(f"{n} {v:.2f}" for n, v in c["own_other_top"] if v >= 0.005) or "-"
                print(f"[train_overhead] round {i + 1} {side:8s}: {r['tokens_per_s']:8,.0f} tok/s ({r['seconds']:.1f} s timed, "
                      f"{r['wall_s']:.0f} s process wall), dtype {r['dtype']}, loss at step {args.warmup} → {args.steps}: "
                      f"{r['loss_start']:.3f} → {r['loss_end']:.3f}; {note(f, cap)}\n"
                      f"    cores in the window: ranks {c['ranks']:.2f} ({r['per_rank_cpu_s']:,.0f} tok per rank CPU-second), "
                      f"the side's other processes {c['own_other']:.2f} ({top}), others {c['others']:.2f}",
                      flush=True)
    finally:
        if tmp is not None:
            tmp.cleanup()

    dtypes = ", ".join(sorted({r["dtype"] for rs in runs.values() for r in rs}))
    r = ratio(figures["rayllm"], figures["baseline"])
    print(f"\n[train_overhead] {where}")
    print(f"[train_overhead] dtype used: {dtypes}; baseline launcher: deepspeed --num_accelerators 2; clean rounds (others "
          f"used <= 0.25 core in both windows): {[i + 1 for i in r.clean] or 'none'}")
    for side in ("baseline", "rayllm"):
        each = ", ".join(f"{f.value:,.0f} ({'contended' if f.contended else 'clean'}, others {f.others:.2f})" for f in figures[side])
        wall = statistics.median(x["wall_s"] for x in runs[side])
        line = f"[train_overhead] {side:8s}: all runs {each}; process wall median {wall:.0f} s; CPU capability {cap}, dtype {dtypes}"
        if r.clean:
            med = statistics.median(figures[side][i].value for i in r.clean)
            eff = statistics.median(runs[side][i]["per_rank_cpu_s"] for i in r.clean)
            line += f"; clean median {med:,.0f} tok/s, {eff:,.0f} tok per rank CPU-second"
        print(line)
    verdict = "" if r.value is None else f"; goal >= {GOAL:.2f}x: {'met' if r.value >= GOAL else 'NOT met'}"
    print(f"[train_overhead] rayllm / baseline = {r.text()}; CPU capability {cap}, dtype {dtypes}{verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
