"""The README's "Mesh shapes and memory per device" table, from the TPU and GPU compilers.

Each case is one `python -m idfuse_jax.compile_check` (see that module) of configs/dreambench.py
or configs/dog.py for a target (v5e-8, v5e-32, v5p-8, 1 and 8 x H100, 8 x A100 40 GB), with the
SD 2.1-base UNet and text encoder and the ViT-H/14 image encoder built from their published
configs in tests/data/configs (no weights: every argument is abstract), at 512 px. `--run`
compiles the cases whose report is not yet in --reports, one at a time, each in its own process
(a full-size TPU compile takes about 10 minutes and 9 GB of host memory on a 2-core machine);
without it, the script prints the table of the reports there.

  PYTHONPATH=. python benchmarks/mesh_memory.py --run                 # compile what is missing
  PYTHONPATH=. python benchmarks/mesh_memory.py --run --cases v5e-32  # one case
  PYTHONPATH=. python benchmarks/mesh_memory.py                       # the table

Compiled for the target, not run: what the compilers cannot see without a device (GPU
autotuning, cuDNN's workspace, the runtime's reservations) is not in these figures.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import subprocess
import sys

from absl import app, flags

from idfuse_jax import targets
from idfuse_jax.cli import fail, parse_flags

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = REPO / "tests" / "data" / "configs"
WEIGHTS = (
    f"--config.model.pretrained={CONFIGS / 'stabilityai' / 'stable-diffusion-2-1-base'}",
    f"--config.model.image_encoder={CONFIGS / 'laion' / 'CLIP-ViT-H-14-laion2B-s32B-b79K'}",
)
GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Case:
    """One row: `config` compiled for `target` with `overrides`; `programs` as compile_check's."""

    name: str
    config: str
    target: str
    overrides: tuple[str, ...] = ()
    programs: str = "step"


BF16 = "--config.model.weights_dtype=bfloat16"
# In the order they are worth compiling: the criteria first.
CASES = [
    Case("v5e-32", "dreambench.py", "v5e-32", programs="features,init,step,sampler,evaluation"),
    Case(
        "8xh100-cudnn",
        "dreambench.py",
        "8xh100",
        ("--config.model.attention=cudnn",),
        "features,init,step,sampler,evaluation",
    ),
    Case("1xh100-dog", "dog.py", "1xh100"),
    Case("8xa100-40", "dreambench.py", "8xa100-40"),
    Case("v5e-8-bf16", "dreambench.py", "v5e-8", (BF16,)),
    Case("v5p-8", "dreambench.py", "v5p-8"),
    Case("8xh100-dog", "dog.py", "8xh100", ("--config.train.batch_size=8",)),
    Case("v5e-8-dog", "dog.py", "v5e-8", ("--config.train.batch_size=8",)),
]

flags.DEFINE_string(
    "reports", str(REPO / "benchmarks" / "compiled"), "Folder of compile_check JSON reports."
)
flags.DEFINE_bool("run", False, "Compile the cases whose report is missing, one at a time.")
flags.DEFINE_list("cases", [c.name for c in CASES], "Which cases (names) to compile or show.")


def command(case: Case, out: pathlib.Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "idfuse_jax.compile_check",
        f"--config={REPO / 'configs' / case.config}",
        f"--target={case.target}",
        *WEIGHTS,
        *case.overrides,
        f"--programs={case.programs}",
        f"--out={out}",
    ]


HEADER = (
    "| target | config, flags | mesh (subject x data x fsdp) | subjects per device | frozen "
    "weights | step: arguments / temporaries / peak GiB | of GiB | fits | model TFLOP per "
    "device | other programs' peak GiB | collectives in the step | compile s |\n"
    "|---|---|---|---:|---|---|---:|---|---:|---:|---|---:|"
)


def described(case: Case) -> str:
    """'dreambench.py, model.attention=cudnn': the config and its overrides."""
    return ", ".join([case.config, *(o.removeprefix("--config.") for o in case.overrides)])


def row(case: Case, report: dict) -> str:
    programs = {r["program"]: r for r in report["programs"]}
    step = programs["step"]
    mesh = report["mesh"]
    slots = -(-report["subjects"] // mesh["subject"]) * mesh["subject"]
    others = [r for name, r in programs.items() if name != "step"]
    other_peak = max((r.get("peak", 0) for r in others), default=None)
    compiled = {name.split(":")[0] for name in programs}
    missing = [p for p in case.programs.split(",") if p not in compiled]
    collectives = ", ".join(f"{k} {v}" for k, v in step.get("collectives", {}).items() if v)
    if "peak" in step:
        memory = f"{step['arguments'] / GIB:.2f} / {step['temporaries'] / GIB:.2f} / "
        memory += f"{step['peak'] / GIB:.2f}"
    else:
        memory = "compiler: out of memory"
    cells = [
        f"{case.target} ({report['device']})",
        described(case),
        f"{mesh['subject']}x{mesh['data']}x{mesh['fsdp']}",
        str(slots // mesh["subject"]),
        report["weights_dtype"],
        memory,
        f"{report['usable_bytes'] / GIB:.1f}",
        "yes" if step["fits"] else "**no**",
        f"{step['model_flops_per_device'] / 1e12:.2f}",
        ("-" if other_peak is None else f"{other_peak / GIB:.2f}")
        + (f" ({', '.join(missing)}: stopped before compiled)" if missing else ""),
        collectives or "none",
        f"{step['compile_seconds']:.0f}",
    ]
    return "| " + " | ".join(cells) + " |"


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}; see --help")
    f = flags.FLAGS
    known = {c.name: c for c in CASES}
    unknown = [name for name in f.cases if name not in known]
    if unknown:
        fail(f"--cases: unknown {unknown}; known: {', '.join(known)}")
    folder = pathlib.Path(f.reports)
    for case in (known[name] for name in f.cases):
        targets.get(case.target)
        out = folder / f"{case.name}.json"
        if f.run and not (out.is_file() and json.loads(out.read_text())["complete"]):
            folder.mkdir(parents=True, exist_ok=True)
            print(f"compiling {case.name} ...", flush=True)
            subprocess.run(command(case, out), cwd=REPO, check=False)
    print(HEADER)
    for case in (known[name] for name in f.cases):
        out = folder / f"{case.name}.json"
        report = json.loads(out.read_text()) if out.is_file() else {"programs": []}
        if any(r["program"] == "step" for r in report["programs"]):
            print(row(case, report))
        else:
            print(f"| {case.target} | {described(case)} | not compiled yet |" + " |" * 9)
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main, flags_parser=parse_flags))
