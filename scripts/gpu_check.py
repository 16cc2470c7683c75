"""One GPU validation run: every check of scripts/gpu_check_list.py, each in its own processes
with its own timeout, its packages installed first; one JSON and one markdown summary.

    bash scripts/gpu_check.sh                       # a bare GPU machine, fresh clone (makes .venv)
    .venv/bin/python scripts/gpu_check.py --out runs/gpu_check [--only a,b] [--budget 900]
    .venv/bin/python scripts/gpu_check.py --cpu-smoke   # no GPU: the CPU checks run, the rest are skipped
    .venv/bin/python scripts/gpu_check.py --dry-run     # nothing runs: the plan, each check "planned"

Each check ends as ``pass``, ``fail`` (its command failed or timed out, or its result was wrong),
``missing`` (a package it needs could not be installed or imported: the pip error is kept) or
``skipped`` (no CUDA, ``--cpu-smoke``, a check it needs did not pass, or the time budget was
spent). A hang costs at most that check's timeout: the whole process group is killed.
Packages go into the running venv with torch and transformers pinned to their installed versions
(a package that needs another torch is reported missing, never allowed to replace it); a check
with its own venv (vLLM, which pins its own torch) gets a fresh one under the output folder.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check_list import CHECKS, Check, Context  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STATUSES = ("pass", "fail", "missing", "skipped", "planned")


@dataclass
class Result:
    name: str
    status: str
    reason: str = ""
    seconds: float = 0.0
    details: dict = field(default_factory=dict)
    log: str = ""


def _tail(text: str, n: int = 1500) -> str:
    return text if len(text) <= n else "..." + text[-n:]


def run_command(argv: list[str], *, timeout: float, env: dict, cwd: Path, log: Path) -> tuple[int | None, str]:
    """Run ``argv`` in its own process group; (exit code or None on timeout, output tail). The
    whole group is killed on timeout, so children (accelerate's workers) go too."""
    with open(log, "ab") as fh:
        fh.write(("$ " + " ".join(argv) + "\n").encode())
        fh.flush()
        p = subprocess.Popen(argv, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = p.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            rc = None
    return rc, _tail(log.read_text(errors="replace"))


def _python_of(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_packages(check: Check, ctx: Context, deadline: float) -> tuple[Path, str | None]:
    """The python the check runs with, and None or why its packages are missing."""
    py = Path(sys.executable)
    log = ctx.out / "logs" / f"{check.name}.install.log"
    if check.venv:
        venv = ctx.out / f"venv-{check.venv}"
        py = _python_of(venv)
        if not py.exists():
            if not ctx.install:
                return py, f"needs its own venv {venv} (--no-install given)"
            rc, tail = run_command([sys.executable, "-m", "venv", str(venv)], timeout=deadline - time.time(),
                                   env=ctx.env, cwd=ROOT, log=log)
            if rc != 0:
                return py, f"could not create {venv}: {tail}"
    for spec, module in check.packages:
        probe = [str(py), "-c", f"import {module}"]
        if subprocess.run(probe, env=ctx.env, capture_output=True).returncode == 0:
            continue
        if not ctx.install:
            return py, f"{spec} is not installed (--no-install given)"
        pins = [] if check.venv else ["-c", str(ctx.constraints)]
        argv = [str(py), "-m", "pip", "install", "-q", *check.pip_args.get(module, ()), *pins, spec]
        rc, tail = run_command(argv, timeout=deadline - time.time(), env=ctx.env, cwd=ROOT, log=log)
        if rc is None:
            return py, f"pip install {spec} did not finish in time"
        if rc != 0 or subprocess.run(probe, env=ctx.env, capture_output=True).returncode != 0:
            return py, f"pip install {spec} failed (torch and transformers pinned): {tail}"
    if check.venv and check.install_repo and ctx.install:
        rc, tail = run_command([str(py), "-m", "pip", "install", "-q", "-e", str(ROOT)],
                               timeout=deadline - time.time(), env=ctx.env, cwd=ROOT, log=log)
        if rc != 0:
            return py, f"vlmalign could not be installed beside {check.packages[0][0]}: {tail}"
    return py, None


def run_check(check: Check, ctx: Context, done: dict[str, Result], budget_end: float) -> Result:
    if ctx.dry_run:
        return Result(check.name, "planned", check.what)
    if check.needs_cuda and not ctx.cuda:
        return Result(check.name, "skipped", "skipped: no CUDA" + (" (--cpu-smoke)" if ctx.cpu_smoke else ""))
    unmet = [d for d in check.needs if done.get(d) is None or done[d].status != "pass"]
    if unmet:
        return Result(check.name, "skipped", f"skipped: needs {', '.join(unmet)}, which did not pass")
    left = budget_end - time.time()
    if left < min(60.0, check.timeout):
        return Result(check.name, "skipped", f"skipped: time budget spent ({left:.0f} s left)")
    t0 = time.time()
    deadline = t0 + min(check.timeout, left)
    py, missing = ensure_packages(check, ctx, deadline)
    if missing:
        return Result(check.name, "missing", f"missing dependency: {missing}", time.time() - t0)
    log = ctx.out / "logs" / f"{check.name}.log"
    for argv in check.commands(ctx, str(py)):
        rc, tail = run_command(argv, timeout=deadline - time.time(), env=ctx.env, cwd=ROOT, log=log)
        if rc is None:
            return Result(check.name, "fail", f"timed out after {check.timeout} s", time.time() - t0, log=tail)
        if rc != 0:
            return Result(check.name, "fail", f"exit code {rc}: {argv[2] if len(argv) > 2 else argv[0]}",
                          time.time() - t0, log=tail)
    try:
        details = check.verify(ctx) if check.verify else {}
    except Exception as e:  # noqa: BLE001 - a wrong result is a failed check, reported with its reason
        return Result(check.name, "fail", f"result check: {type(e).__name__}: {e}", time.time() - t0)
    return Result(check.name, "pass", "", time.time() - t0, details)


def environment(ctx: Context) -> dict:
    """Versions of the packages in this venv after the checks (None: not installed)."""
    from importlib.metadata import PackageNotFoundError, version
    info = {"python": sys.version.split()[0], "cuda": ctx.cuda, "gpus": ctx.gpu_names, "mode": ctx.mode,
            "peak_tflops": ctx.peak_tflops}
    for dist in ("torch", "transformers", "accelerate", "peft", "trl", "bitsandbytes", "deepspeed", "flash-attn"):
        try:
            info[dist] = version(dist)
        except PackageNotFoundError:
            info[dist] = None
    return info


def markdown(report: dict) -> str:
    env = report["environment"]
    counts = {s: sum(1 for r in report["checks"] if r["status"] == s) for s in STATUSES}
    lines = ["# vlmalign GPU check", "",
             f"{report['started']}, mode `{env['mode']}`, GPUs: {', '.join(env['gpus']) or 'none'}; "
             f"torch {env['torch']}, transformers {env['transformers']}; {report['seconds']:.0f} s.", "",
             ", ".join(f"{n} {s}" for s, n in counts.items() if n), "",
             "| check | status | seconds | what / why |", "|---|---|---|---|"]
    for r in report["checks"]:
        note = r["reason"] or ", ".join(f"{k} {v}" for k, v in r["details"].items())
        lines.append(f"| {r['name']} | {r['status']} | {r['seconds']:.0f} | {note.replace('|', '/')[:300]} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="runs/gpu_check", help="output folder: gpu_check.json, gpu_check.md, logs/")
    p.add_argument("--only", default="", help="comma list of checks to run (what they need runs too)")
    p.add_argument("--budget", type=float, default=900, help="seconds for all checks; later ones are skipped")
    p.add_argument("--cpu-smoke", action="store_true", help="run only the checks that need no CUDA")
    p.add_argument("--dry-run", action="store_true", help="run nothing: list the plan")
    p.add_argument("--no-install", action="store_true", help="install no package: a missing one is reported")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the GPU's dense bf16 peak for MFU (default: from its name where known)")
    p.add_argument("--list", action="store_true", help="print the checks and exit")
    return p.parse_args(argv)


def select(checks: list[Check], only: str) -> list[Check]:
    if not only:
        return checks
    by = {c.name: c for c in checks}
    unknown = [n for n in only.split(",") if n not in by]
    if unknown:
        raise SystemExit(f"unknown check(s): {', '.join(unknown)}; known: {', '.join(by)}")
    want: set[str] = set()
    todo = only.split(",")
    while todo:
        n = todo.pop()
        if n not in want:
            want.add(n)
            todo.extend(by[n].needs)
    return [c for c in checks if c.name in want]


def main(argv=None, checks: list[Check] | None = None) -> int:
    args = parse_args(argv)
    checks = select(list(CHECKS if checks is None else checks), args.only)
    if args.list:
        for c in checks:
            print(f"{c.name:20s} {'CUDA' if c.needs_cuda else 'CPU ':4s} {c.timeout:4d} s  {c.what}")
        return 0
    ctx = Context.create(Path(args.out), cpu_smoke=args.cpu_smoke, dry_run=args.dry_run,
                         install=not args.no_install, peak_tflops=args.peak_tflops)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    t0 = time.time()
    done: dict[str, Result] = {}
    for c in checks:
        r = run_check(c, ctx, done, t0 + args.budget)
        done[c.name] = r
        print(f"[gpu_check] {c.name}: {r.status}{' - ' + r.reason if r.reason else ''} ({r.seconds:.0f} s)",
              flush=True)
    report = {"started": started, "seconds": time.time() - t0, "environment": environment(ctx),
              "checks": [asdict(r) for r in done.values()]}
    (ctx.out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    (ctx.out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    return 1 if any(r.status == "fail" for r in done.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
