"""The one-command GPU check (benchmarks/gpu/run.sh): one markdown table of what a full-size run gets from
one GPU. Goal on one H100: under 8 minutes.

    benchmarks/gpu/run.sh              # on a CUDA GPU: full-size models, bf16
    benchmarks/gpu/run.sh --dry-run    # the same code on the CPU with tiny models (tests/test_gpu_bench.py)

Rows:
1. DVGT-1 training step (forward, backward, fused AdamW step; bf16 autocast, model.activation_checkpointing
   as --activation-checkpointing; random 16:9 images, a loss over every output) at 2, 4 and 8 frames of
   6 cameras, eager and with regional compilation (model.compile_blocks): median step time of --steps steps
   after a warm-up, model FLOP/s and MFU (dvgt/train/flops.py; against the card's dense bf16 peak).
2. Peak memory (torch.cuda.max_memory_allocated) of the eager steps, fitted as dvgt profile-memory does,
   against the catalog profile of this card (charts/dvgt/files/catalog.yaml): does its
   maxImagesPerForward fit below (1 - margin) of its memory, and how many images would.
3. DVGT-2 streaming inference (model.step, one frame of 6 cameras at a time, KV-cache window 4, bf16):
   latency per frame once the window is full.
4. A checkpoint of the DVGT-1 model and AdamW state (dvgt.checkpoint.manager, async, to a local folder):
   the time training is blocked (device-to-host copy) against the whole save.
5. GPU memory as the exporter reads it (NVML, dvgt.metrics.nvml) against torch's view (reserved by the
   caching allocator; used as the driver reports it to torch).
A dry run prints the CPU's values where they mean something and "n/a (no GPU)" where they need one.
"""

from __future__ import annotations

import argparse
import gc
import platform
import re
import statistics
import sys
import tempfile
import time

import torch

from dvgt.models import DVGT1, DVGT2, SIZES, DVGT1Size
from dvgt.models.layers import KVCache
from dvgt.train.flops import StepFlops, device_peak_flops
from dvgt.train.optim import build_optimizer
from dvgt.train.profile_memory import GIB, fit_memory, max_images
from dvgt.train.speedups import attention_context, attention_order, compile_blocks

NO_GPU = "n/a (no GPU)"
# The dry run's models: one backbone block and one aggregator step, so that its compilation takes seconds
DRY_RUN_SIZE = DVGT1Size(32, 2, 1, 1, 16, (8, 16, 32, 32), (0, 0, 0, 0), 1)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def readable(value: float, unit: str) -> str:
    """1.23e12 -> '1.23 T<unit>' (k, M, G, T, P)."""
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def all_outputs_loss(outputs: dict) -> torch.Tensor:
    tensors = [v for v in outputs.values() if torch.is_tensor(v)]
    tensors += [t for v in outputs.values() if isinstance(v, list) for t in v]
    return sum(t.float().mean() for t in tensors if t.requires_grad)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.dry = args.dry_run
        self.device = torch.device("cpu" if self.dry else "cuda")
        self.size = DRY_RUN_SIZE if self.dry else SIZES["full"]
        self.amp = not self.dry  # bf16 autocast on the GPU; float32 on the CPU
        self.peak, self.peak_source = device_peak_flops(self.device, args.peak_tflops)
        self.rows: list[tuple[str, str, str]] = []  # (measure, setting, value)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def images(self, frames: int) -> torch.Tensor:
        a = self.args
        return torch.rand(1, frames, a.views, 3, a.height, a.width, device=self.device)

    def add(self, measure: str, setting: str, value: str) -> None:
        self.rows.append((measure, setting, value))
        print(f"  {measure} | {setting} | {value}", file=sys.stderr, flush=True)

    # -- 1 and 2: DVGT-1 training steps, eager and compiled; peak memory --------------------------------
    def training(self) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        a = self.args
        torch.manual_seed(0)
        with self.device:
            model = DVGT1(self.size, activation_checkpointing=a.activation_checkpointing).train()
        optimizer = build_optimizer(model, 1e-4, 0.05, [0.9, 0.95], fused=self.device.type == "cuda")
        flops = StepFlops(model)
        peaks = []
        for mode in ("eager", "compiled"):
            if mode == "compiled":
                compile_blocks(model)
            for frames in a.frames:
                setting = f"{frames} frames x {a.views} cameras, {mode}"
                try:
                    seconds, peak = self.time_steps(model, optimizer, frames)
                except torch.cuda.OutOfMemoryError:
                    self.add("DVGT-1 training step", setting, "out of memory")
                    optimizer.zero_grad(set_to_none=True)
                    continue
                achieved = flops(1, frames, a.views, a.height, a.width) / seconds
                mfu = f"MFU {achieved / self.peak:.1%}" if self.peak else "MFU n/a (no peak on a CPU)"
                self.add(
                    "DVGT-1 training step", setting, f"{seconds * 1000:.0f} ms, {readable(achieved, 'FLOP/s')}, {mfu}"
                )
                if mode == "eager" and peak is not None:
                    peaks.append((frames * a.views, peak))
        self.memory_rows(peaks)
        return model, optimizer

    def time_steps(self, model, optimizer, frames: int) -> tuple[float, int | None]:
        images = self.images(frames)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        times = []
        for _ in range(1 + self.args.steps):  # the first is a warm-up (and compiles)
            started = time.perf_counter()
            with self.autocast():
                outputs = model(images)
            all_outputs_loss(outputs).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            del outputs
            synchronize(self.device)
            times.append(time.perf_counter() - started)
        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
        return statistics.median(times[1:]), peak

    def memory_rows(self, peaks: list[tuple[int, int]]) -> None:
        if self.device.type != "cuda":
            self.add("peak memory vs the profile", "DVGT-1 eager steps", NO_GPU)
            return
        for images, peak in peaks:
            self.add("peak memory", f"{images} images per forward", f"{peak / GIB:.1f} GiB")
        if len(peaks) < 2:
            self.add("peak memory vs the profile", "fit", "needs two frame counts that fit")
            return
        from dvgt.k8s.catalog import load_catalog

        profiles = load_catalog().profiles
        memory_gib = torch.cuda.get_device_properties(self.device).total_memory / GIB
        name = self.args.profile or profile_of(torch.cuda.get_device_name(self.device), memory_gib, profiles)
        fit = fit_memory(peaks)
        predicted = fit.fixed_bytes + fit.per_image_bytes * profiles[name].max_images_per_forward
        budget = (1 - self.args.margin) * profiles[name].memory_gib * GIB
        fits = max_images(fit, profiles[name].memory_gib * GIB, self.args.margin)
        self.add(
            "peak memory vs the profile",
            f"{name}: {profiles[name].max_images_per_forward} images per forward (catalog)",
            f"{predicted / GIB:.1f} GiB of a {budget / GIB:.1f} GiB budget ({'fits' if predicted <= budget else 'DOES NOT FIT'}); "
            f"measured fit {fit.fixed_bytes / GIB:.1f} + {fit.per_image_bytes / GIB:.2f} GiB/image -> {fits} images",
        )

    # -- 3: DVGT-2 streaming ------------------------------------------------------------------------------
    def streaming(self) -> None:
        a = self.args
        torch.manual_seed(0)
        with self.device:  # DVGT-2 with planning, the decoder of the full size
            model = DVGT2(self.size, decoder_dim=64 if self.dry else 256, decoder_heads=4 if self.dry else 16).eval()
        images = self.images(a.stream_frames)
        caches = [KVCache() for _ in model.aggregator.cross_frame_blocks]
        ego_cache, latencies = None, []
        with torch.no_grad(), self.autocast():
            for t in range(a.stream_frames):
                synchronize(self.device)
                started = time.perf_counter()
                _, ego_cache = model.step(images[:, t], t, caches, ego_cache, a.window)
                synchronize(self.device)
                latencies.append(time.perf_counter() - started)
        steady = latencies[a.window :] or latencies[1:]
        self.add(
            "DVGT-2 streaming latency per frame",
            f"{a.views} cameras, window {a.window}, frames {a.window + 1}-{a.stream_frames}",
            f"{statistics.median(steady) * 1000:.0f} ms (first frame {latencies[0] * 1000:.0f} ms)",
        )

    # -- 4: checkpoint -------------------------------------------------------------------------------------
    def checkpoint(self, model, optimizer) -> None:
        from dvgt.checkpoint.manager import CheckpointManager

        with tempfile.TemporaryDirectory(dir=self.args.checkpoint_dir) as folder:
            manager = CheckpointManager(folder, async_mode="wait")
            started = time.perf_counter()
            manager.save(
                1,
                model_state=model.state_dict(),
                optimizer_state=optimizer.state_dict(),
                trainer_state={"step": 1},
                config_yaml="",
                epoch=0,
            )
            blocked = time.perf_counter() - started
            manager.wait()
            total = time.perf_counter() - started
            event = manager.stats.last_event
        where = "device-to-host copies" if self.device.type == "cuda" else "CPU tensors, no device copy"
        self.add(
            "checkpoint save (DVGT-1 model + AdamW)",
            f"{readable(event.bytes, 'B')} to a local folder, {where}",
            f"blocked {blocked:.2f} s of {total:.2f} s total ({event.outcome})",
        )

    # -- 5: NVML vs torch ----------------------------------------------------------------------------------
    def nvml(self) -> None:
        from dvgt.metrics.nvml import NvmlCollector

        families = {f.name: f for f in NvmlCollector({}).collect()}
        if self.device.type != "cuda" or "dvgt_gpu_memory_used_bytes" not in families:
            gpus = families["dvgt_exporter_gpus"].samples[0].value
            self.add("GPU memory: exporter (NVML) vs torch", "", f"{NO_GPU}: NVML sees {gpus:g} GPUs")
            return
        index = self.device.index or 0
        used = next(s.value for s in families["dvgt_gpu_memory_used_bytes"].samples if s.labels["gpu"] == str(index))
        free, total = torch.cuda.mem_get_info(self.device)
        reserved = torch.cuda.memory_reserved(self.device)
        self.add(
            "GPU memory: exporter (NVML) vs torch",
            f"GPU {index}, DVGT-1 training state resident",
            f"NVML used {used / GIB:.2f} GiB; torch: driver used {(total - free) / GIB:.2f} GiB, "
            f"reserved {reserved / GIB:.2f} GiB (NVML - reserved = {(used - reserved) / GIB:.2f} GiB: "
            f"CUDA context and non-PyTorch memory)",
        )

    def run(self) -> str:
        started = time.perf_counter()
        with attention_context(attention_order("auto", self.device)):
            model, optimizer = self.training()
            self.nvml()
            self.checkpoint(model, optimizer)
            del model, optimizer
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.streaming()
        return self.table(time.perf_counter() - started)

    def table(self, seconds: float) -> str:
        a = self.args
        if self.device.type == "cuda":
            card = f"{torch.cuda.get_device_name(self.device)}, driver {driver_version()}, CUDA {torch.version.cuda}"
        else:
            card = (
                f"DRY RUN on the CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
            )
        lines = [
            f"GPU check: {card}; torch {torch.__version__}; {'tiny models' if self.dry else 'full-size models'}, "
            f"images {a.width}x{a.height}, AC {a.activation_checkpointing}; "
            f"MFU peak: {f'{self.peak / 1e12:g} TFLOP/s' if self.peak else 'none'} ({self.peak_source}); "
            f"{seconds:.0f} s",
            "",
            "| measure | setting | value |",
            "| --- | --- | --- |",
        ]
        lines += [f"| {m} | {s} | {v} |" for m, s, v in self.rows]
        return "\n".join(lines)


def profile_of(device_name: str, memory_gib: float, profiles: dict) -> str:
    """The catalog profile of a card: among those whose name starts with the card's model as a word of
    its name (h100-80g for "NVIDIA H100 80GB HBM3", not h20-146g for an H200), the one closest in memory;
    without such a profile, the GPU profile closest in memory."""
    gpu = {name: p for name, p in profiles.items() if p.memory_gib}
    named = {n: p for n, p in gpu.items() if re.search(rf"\b{re.escape(n.split('-')[0])}\b", device_name, re.I)}
    return min(named or gpu, key=lambda n: abs(gpu[n].memory_gib - memory_gib))


def driver_version() -> str:
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlSystemGetDriverVersion()
    except Exception:  # the table still prints without it
        return "unknown"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny models on the CPU (no GPU needed)")
    parser.add_argument("--frames", type=int, nargs="+", help="frame counts of the training rows (default 2 4 8)")
    parser.add_argument("--views", type=int, default=6, help="cameras per frame")
    parser.add_argument("--width", type=int, help="image width (default 512; dry run 32)")
    parser.add_argument("--height", type=int, help="image height (default 288; dry run 32)")
    parser.add_argument("--steps", type=int, help="timed steps per setting after one warm-up (default 3; dry run 1)")
    parser.add_argument("--activation-checkpointing", default="full", help="none | full | selective | every_other")
    parser.add_argument("--stream-frames", type=int, help="frames streamed through DVGT-2 (default 8; dry run 3)")
    parser.add_argument("--window", type=int, default=4, help="DVGT-2 streaming window (frames)")
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak for MFU (default: the card's)")
    parser.add_argument("--profile", help="catalog profile to compare with (default: the card's)")
    parser.add_argument("--margin", type=float, default=0.1, help="memory safety margin, as dvgt profile-memory")
    parser.add_argument("--checkpoint-dir", help="where the checkpoint is written (default: the temp folder)")
    args = parser.parse_args(argv)
    gpu = dict(frames=[2, 4, 8], width=512, height=288, steps=3, stream_frames=8)
    dry = dict(frames=[2], width=32, height=32, steps=1, stream_frames=3)
    for key, value in (dry if args.dry_run else gpu).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.dry_run:
        args.window = min(args.window, 2)
        args.views = min(args.views, 2)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print(
            "error: the GPU check needs a CUDA GPU and none is visible; run it with --dry-run on a CPU", file=sys.stderr
        )
        return 2
    print(Bench(args).run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
