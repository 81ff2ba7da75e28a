"""Shared by the benchmarks: process set-up, timing with medians, peak RSS, and how busy the rest
of the (shared) machine was while we measured."""

from __future__ import annotations

import os
import resource
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

# Reference numbers of the TRL peer (torch 2.13 CPU, transformers, TRL 1.12; same shapes, 1 thread),
# from ../shared/peer/trl/README.md, per `--shapes`; compare_trl.sh re-measures them side by side.
# A shape the peer's README has no number for gets no ratio (a toy-shape number would mislead).
PEER_REFERENCE = {
    "default": {"hf_generate_tokens_per_second": 1913.0, "trl_ppo_step_seconds": 1.11, "trl_ppo_peak_rss_mib": 823.0},
    "smollm2": {"trl_ppo_step_seconds": 43.2, "trl_ppo_peak_rss_mib": 8248.0},  # 2026-12-01, AVX2-only AMD EPYC
}
# The peer's GRPO / RLOO steps (bench_trl_grpo_rloo.py: 4 prompts x 2 completions, 1 thread), per --shapes.
PEER_REFERENCE_BY_ALGORITHM = {"grpo": {"default": 0.548}, "rloo": {"default": 0.587}}


def setup_process(threads: int = 1, mkl_avx2: bool = False) -> dict:
    """Environment every benchmark sets BEFORE importing paddle.

    OMP_WAIT_POLICY=PASSIVE: spin-waiting OpenMP threads wreck timings on a shared 2-core box.
    MKL_DEBUG_CPU_TYPE: on AMD CPUs every entry point sets 5 (MKL's AVX2 GEMM kernels instead of
    its generic path) unless the user exported a value (`ppo.runtime.prepare_process`);
    `mkl_avx2` forces 5 on any CPU (no effect on Intel). The result names the CPU so the
    benchmark output says which kernels were measured.
    """
    if "paddle" in sys.modules:
        raise RuntimeError("setup_process must run before paddle is imported")
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if mkl_avx2:
        os.environ["MKL_DEBUG_CPU_TYPE"] = "5"
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from ppo.runtime import prepare_process

    prepared = prepare_process()
    environment = {key: os.environ.get(key) for key in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_DEBUG_CPU_TYPE")}
    environment["cpu"] = prepared["cpu"]
    environment["mkl_set_automatically"] = bool(prepared["set"])
    return environment


def gemm_probe(m: int = 512, k: int = 576, n: int = 1536, repeats: int = 8, rounds: int = 3) -> dict:
    """GFLOP/s of one fp32 `paddle.matmul` [m, k] x [k, n] in this process (so with the MKL kernel
    choice and thread count the benchmark ran with). The default shape is a SmolLM2 MLP projection
    over 512 tokens, the size of most training and scoring GEMMs. The best of `rounds` rounds of
    `repeats` calls is the rate: a floor should be reachable, and a shared machine only ever
    slows a round down."""
    import paddle

    a, b = paddle.randn([m, k], dtype="float32"), paddle.randn([k, n], dtype="float32")
    paddle.matmul(a, b).numpy()  # first call: kernel selection and allocation
    seconds = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeats):
            out = paddle.matmul(a, b)
        out.numpy()  # CPU kernels are synchronous; this only keeps the result alive
        seconds.append((time.perf_counter() - start) / repeats)
    flops = 2.0 * m * k * n
    return {
        "shape": f"[{m},{k}]x[{k},{n}]",
        "gflops_per_second": flops / min(seconds) / 1e9,
        "gflops_per_second_median": flops / statistics.median(seconds) / 1e9,
    }


def decode_weight_matmuls(model, batch: int):
    """A callable running one decode step's weight matmuls on `model`'s own weights, with the
    kernels the engine's decode step uses (`ppo.models.cpu_decode.streaming_level`: the streaming
    kernels on 32-column panels, or MKL's sgemm): per layer [batch, hidden] x q|k, v, o, gate|up
    and down, then the LM head. Nothing else a decoder does (attention, norms, sampling) is in
    it, so no decoder built from these matmuls is faster: at a few rows it streams every weight
    from memory once, the memory-bound floor of a decode step."""
    import paddle

    from ppo.models.cpu_decode import panel_product, streaming_level, to_panels
    from ppo.models.infer_model_utils import collect_decoder_weights

    weights = collect_decoder_weights(model)
    per_layer = [(layer.query_key, layer.value, layer.o_proj, layer.gate_up, layer.down_proj) for layer in weights.layers]
    hidden_in = paddle.randn([batch, weights.layers[0].o_proj.shape[-1]])
    intermediate_in = paddle.randn([batch, weights.layers[0].down_proj.shape[0]])
    level = streaming_level()
    if level > 0:
        panels = [[(to_panels(w), w.shape[1]) for w in layer] for layer in per_layer]
        head = weights.lm_head if weights.lm_head_transposed else weights.lm_head.transpose([1, 0]).contiguous()

        @paddle.no_grad()
        def streamed_step():
            for (query_key, value, o_proj, gate_up, down) in panels:
                for (panel, columns), x in ((query_key, hidden_in), (value, hidden_in), (o_proj, hidden_in),
                                            (gate_up, hidden_in), (down, intermediate_in)):  # fmt: skip
                    panel_product(x, panel, level, panel_columns=columns)
            panel_product(hidden_in, head, level, head=True)

        return streamed_step

    @paddle.no_grad()
    def step():
        for query_key, value, o_proj, gate_up, down in per_layer:
            paddle.matmul(hidden_in, query_key)
            paddle.matmul(hidden_in, value)
            paddle.matmul(hidden_in, o_proj)
            paddle.matmul(hidden_in, gate_up)
            paddle.matmul(intermediate_in, down)
        paddle.matmul(hidden_in, weights.lm_head, transpose_y=weights.lm_head_transposed)

    return step


def decode_matmul_seconds(model, batch: int, steps: int, rounds: int = 3) -> float:
    """Wall seconds of `steps` decode steps' weight matmuls (`decode_weight_matmuls`), the best
    of `rounds` (a floor should be reachable; a shared machine only ever slows a round down)."""
    step = decode_weight_matmuls(model, batch)
    step()  # kernel selection and allocation

    def run_steps():
        for _ in range(steps):
            step()

    return time_repeats(run_steps, rounds, warmup=0)["s_min"]


def describe_mkl(environment: dict) -> str:
    """One line: MKL's CPU type, whether `prepare_process` set it for this CPU (no when it was
    exported or forced by --mkl-avx2, or the CPU is not AMD), and the CPU."""
    value = environment.get("MKL_DEBUG_CPU_TYPE")
    automatic = "yes" if environment.get("mkl_set_automatically") else "no"
    return f"MKL_DEBUG_CPU_TYPE={value if value is not None else '(unset)'} (set automatically: {automatic}); CPU {environment.get('cpu')}"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def _machine_busy_seconds() -> float:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class Window:
    """Wall time, our CPU time, and the CPU other processes used (in cores) over a block."""

    def __enter__(self):
        self._wall, self._cpu, self._busy = time.perf_counter(), time.process_time(), _machine_busy_seconds()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self._wall
        self.own_cpu = time.process_time() - self._cpu
        foreign = max(0.0, _machine_busy_seconds() - self._busy - self.own_cpu)
        self.foreign_cores = foreign / self.wall if self.wall > 0 else 0.0
        return False


def time_repeats(fn, repeats: int, warmup: int) -> dict:
    """Median/min/max wall seconds of `fn` over `repeats` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    walls, cpus = [], []
    with Window() as window:
        for _ in range(repeats):
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
    return {
        "s_median": statistics.median(walls),
        "s_min": min(walls),
        "s_max": max(walls),
        "own_cpu_s_median": statistics.median(cpus),
        "foreign_cores_avg": round(window.foreign_cores, 2),
    }


def emit_result(result: dict, json_path=None) -> None:
    """The benchmark's final line: one JSON object on stdout (and in `json_path` if given), with
    whether the C++ CPU extension ran (`ppo/models/cpu_extension.py`)."""
    import json

    from ppo.models import cpu_extension

    if cpu_extension.load_extension.cache_info().currsize:  # only report what this run asked for
        reason = cpu_extension.unavailable_reason()
        result.setdefault("environment", {})["cpu_extension"] = "loaded" if reason is None else f"unavailable: {reason}"
        if reason is None:
            from ppo.models.cpu_decode import VECTOR_LEVELS, streaming_level

            names = {level: name for name, level in VECTOR_LEVELS.items()}
            result["environment"]["decode_projections"] = names[streaming_level()]

    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(result))
