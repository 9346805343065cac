"""Training and inference speed and accuracy on one GPU, in one process, stage by stage.

    python3 benchmarks/bench_gpu.py --data /tmp/cifar10 --json results.json
    python3 benchmarks/bench_gpu.py --tiny --device cpu --data ../shared/data/cifar10 \\
        --json /tmp/bench-tiny.json                    # CPU smoke run on a small subset
    python3 benchmarks/bench_gpu.py --summary results.json   # print the tables again

Stages, in order of importance (`--stages` picks some; each is guarded by the time left
of `--budget` seconds, and the results file (benchmarks/_common.py's record, default
benchmarks/results/gpu-<date>.json) is rewritten after every stage, so a stage that
fails or a timeout loses nothing already measured):

  data       decode CIFAR-10 once through center_embed.data.load_dataset (cached)
  warmup     one epoch of the `gpu` preset: CUDA context, kernel loading and cuDNN
             heuristics land here, not in the timed runs
  gpu        the `gpu` preset for --seeds seeds with the preset's λ and as many with λ = 0
             (same schedule; the centers still move, only the loss ignores them),
             interleaved; the ratio of their loop times is the center loss's overhead
  wide       the `gpu-wide` preset for --wide-seeds seeds
  inference  torch on the device: uint8 images -> normalise -> embed -> distances to the
             centers -> nearest, fp32 and bf16 autocast, batch 1, 64 and 1024 (CUDA
             events; images/s and p50 latency); onnxruntime on the exported model when it
             has the CUDAExecutionProvider (otherwise said and skipped)
  centerloss one CenterLoss step, dense and sparse paths, C = 10 ... 100,000
  syncaudit  one epoch of the `gpu` preset under torch.cuda.set_sync_debug_mode("warn"):
             which source lines make the host wait for the device, and how often
  extra      the `gpu` preset at 12 and 20 epochs (one seed each), and once as users
             run it (its own validation and checkpoints every few epochs)
  cudnn      torch.backends.cudnn.benchmark on (two runs: the first autotunes)
  compile    train.compile=true (train.training_forward: torch.compile on CUDA, with
             inductor's emulate_precision_casts against the bf16 amax NaN); two runs, the
             first pays the compilation

Timed runs take `--set train.eval_every=1000 train.progress=false`: no validation or
checkpoint inside the timed loop (the last epoch always validates, after the loop).
Per run: loop seconds (first batch to the end of the last epoch, measured by a hook on
BatchLoader.epoch, device synchronised), setup seconds (dataset from the cache to the
device, whitening), wall seconds of train() (plus final validation and checkpoints),
images/s over the loop, and test accuracy: nearest-center and softmax, plain and with
flip + shift TTA (train.split_metrics on the test split), from best.pt.

The stages live in gpu_stages.py (torch, imported after the arguments), the tables in
gpu_report.py (`--summary` and `--help` need no torch).
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import time
from pathlib import Path

# _common puts this checkout first on sys.path (an editable install of another checkout
# would silently win otherwise), unless the caller staged the package on PYTHONPATH and
# says so (CENTER_EMBED_STAGED=1, benchmarks/gpu_session.sh). The results record which
# files were imported.
from _common import ROOT, add_json_argument
from gpu_report import table

STAGES = [
    "data",
    "warmup",
    "gpu",
    "wide",
    "inference",
    "centerloss",
    "syncaudit",
    "extra",
    "cudnn",
    "compile",
]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10"))
    p.add_argument("--seeds", type=int, default=3, help="seeds of `gpu`, each with λ and λ=0")
    p.add_argument("--wide-seeds", type=int, default=2, help="seeds of `gpu-wide`")
    p.add_argument("--device", default="cuda")
    add_json_argument(p)
    p.add_argument("--tiny", action="store_true", help="tiny models on a data subset (CPU)")
    p.add_argument("--budget", type=float, default=330.0, help="seconds for all stages")
    p.add_argument("--stages", help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--work", help="scratch folder (default: a new temporary one)")
    p.add_argument("--cache", help="dataset cache (default: $CENTER_EMBED_CACHE or --work)")
    p.add_argument("--summary", metavar="JSON", help="print the tables of a results file")
    args = p.parse_args()
    if args.summary:
        print(table(json.loads(Path(args.summary).read_text())))
        return 0
    import gpu_stages  # torch: after the arguments, so --help and --summary need none
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available (use --tiny --device cpu to try it)")
    wanted = args.stages.split(",") if args.stages else STAGES
    unknown = sorted(set(wanted) - set(STAGES))
    if unknown:
        p.error(f"unknown stages {unknown}; choose from {STAGES}")

    def stop(signum, frame):
        raise gpu_stages.Stopped

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    bench = gpu_stages.Bench(args)
    print(json.dumps(bench.results["environment"], indent=2), flush=True)
    bench.write()
    for name in STAGES:
        stage = getattr(gpu_stages, f"stage_{name}")
        if name in wanted and not gpu_stages.run_stage(bench, name, stage):
            break
    bench.results["seconds"] = round(time.monotonic() - bench.started, 1)
    bench.write()
    print("\n" + table(bench.results), flush=True)
    if not args.work:
        shutil.rmtree(bench.work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
