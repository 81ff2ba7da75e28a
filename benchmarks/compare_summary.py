"""Summarise a compare_trl.sh results folder: medians over rounds of ours and the TRL peer's
numbers, and the ratios the issue's targets are stated in. The last line is JSON.

Usage: python benchmarks/compare_summary.py RESULTS_DIR
"""

from __future__ import annotations

import glob
import json
import os
import statistics
import sys

TARGETS = {
    "ppo_step_throughput_vs_trl": 1.0,
    "rollout_vs_hf_generate": 1.5,
    "grpo_step_throughput_vs_trl": 1.5,
    "rloo_step_throughput_vs_trl": 1.5,
}
# Targets at the SmolLM2-135M shapes (matmul-bound: no PaddleNLP-generate target).
TARGETS_BY_SHAPES = {"smollm2": {"ppo_step_throughput_vs_trl": 1.2, "rollout_vs_hf_generate": 1.3}}
CRITIC_FREE = ("grpo", "rloo")


def load(folder: str, pattern: str) -> list:
    return [json.load(open(path)) for path in sorted(glob.glob(os.path.join(folder, pattern)))]


def median(values):
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 4) if values else None


def summarise(folder: str) -> dict:
    peer_gen, ours_gen = load(folder, "peer_generate_*.json"), load(folder, "ours_generate_*.json")
    peer_ppo, ours_ppo = load(folder, "peer_ppo_*.json"), load(folder, "ours_ppo_*.json")
    if not (peer_gen and ours_gen and peer_ppo and ours_ppo):
        raise SystemExit(f"{folder} lacks one of peer/ours generate/ppo results")
    numbers = {
        "hf_generate_tokens_per_second": median(r["generate_use_cache"]["tokens_per_s"] for r in peer_gen),
        "engine_tokens_per_second": median(r["tokens_per_second"]["engine"] for r in ours_gen),
        "paddlenlp_generate_tokens_per_second": median(r["tokens_per_second"].get("paddlenlp_generate") for r in ours_gen),
        "compute_floor_tokens_per_second": median(r["compute_floor_tokens_per_second"] for r in ours_gen),
        "trl_ppo_step_seconds": median(r["step_s_median"] for r in peer_ppo),
        "ppo_step_seconds": median(r["ppo_step_seconds"] for r in ours_ppo),
        "trl_peak_rss_mib": median(r["peak_rss_mib"] for r in peer_ppo),
        "peak_rss_mib": median(r["peak_rss_mib"] for r in ours_ppo),
        "hf_fwd_bwd_8x96_seconds": median(r["fwd_bwd"]["s_median"] for r in peer_gen),
        "ours_phases_seconds": {phase: median(r["phases"][phase] for r in ours_ppo) for phase in ours_ppo[0]["phases"]},
        "trl_generation_phase_seconds": median(r["gen_phase_s_median"] for r in peer_ppo),
        "ppo_share_of_floor": median(r.get("floor", {}).get("share_of_floor") for r in ours_ppo),
        "ppo_floor_seconds": median(r.get("floor", {}).get("floor_seconds") for r in ours_ppo),
        "ppo_share_of_streaming_floor": median(r.get("floor", {}).get("share_of_streaming_floor") for r in ours_ppo),
        "ppo_streaming_floor_seconds": median(r.get("floor", {}).get("streaming_floor_seconds") for r in ours_ppo),
    }
    ratios = {
        "ppo_step_throughput_vs_trl": round(numbers["trl_ppo_step_seconds"] / numbers["ppo_step_seconds"], 2),
        "rollout_vs_hf_generate": round(numbers["engine_tokens_per_second"] / numbers["hf_generate_tokens_per_second"], 2),
        "peak_rss_vs_trl": round(numbers["peak_rss_mib"] / numbers["trl_peak_rss_mib"], 2),
    }
    if numbers["paddlenlp_generate_tokens_per_second"]:
        ratios["rollout_vs_paddlenlp_generate"] = round(
            numbers["engine_tokens_per_second"] / numbers["paddlenlp_generate_tokens_per_second"], 2
        )
    # Own-CPU-time versions of the same ratios: less sensitive to other load on a shared machine
    # (a process that waits for a core loses wall time, not CPU time).
    hf_cpu = median(r["generate_use_cache"]["own_cpu_s_median"] for r in peer_gen)
    engine_cpu = median(r["timings"]["engine"]["own_cpu_s_median"] for r in ours_gen)
    cpu_ratios = {
        "rollout_vs_hf_generate": round(hf_cpu / engine_cpu, 2),
        "ppo_step_throughput_vs_trl": round(
            median(r["step_own_cpu_s_median"] for r in peer_ppo)
            / median(r.get("step_own_cpu_seconds_median") for r in ours_ppo), 2),
    }
    if numbers["paddlenlp_generate_tokens_per_second"]:
        paddlenlp_cpu = median(r["timings"]["paddlenlp_generate"]["own_cpu_s_median"] for r in ours_gen)
        cpu_ratios["rollout_vs_paddlenlp_generate"] = round(paddlenlp_cpu / engine_cpu, 2)
    for algorithm in CRITIC_FREE:  # compare_trl.sh's RL_ALGORITHMS, when they ran
        peer, ours = load(folder, f"peer_{algorithm}_*.json"), load(folder, f"ours_{algorithm}_*.json")
        if not (peer and ours):
            continue
        numbers[f"trl_{algorithm}_step_seconds"] = median(r["step_s_median"] for r in peer)
        numbers[f"{algorithm}_step_seconds"] = median(r["ppo_step_seconds"] for r in ours)
        numbers[f"ours_{algorithm}_phases_seconds"] = {phase: median(r["phases"][phase] for r in ours) for phase in ours[0]["phases"]}
        ratios[f"{algorithm}_step_throughput_vs_trl"] = round(
            numbers[f"trl_{algorithm}_step_seconds"] / numbers[f"{algorithm}_step_seconds"], 2
        )
        cpu_ratios[f"{algorithm}_step_throughput_vs_trl"] = round(
            median(r["step_own_cpu_s_median"] for r in peer) / median(r["step_own_cpu_seconds_median"] for r in ours), 2
        )
    numbers["trl_ppo_phases_seconds"] = {
        phase: median(r.get("phase_s_median", {}).get(phase) for r in peer_ppo) for phase in peer_ppo[0].get("phase_s_median", {})
    }
    numbers["other_processes_cores"] = {
        "peer_generate": median(r["generate_use_cache"]["window"]["foreign_cores_avg"] for r in peer_gen),
        "ours_generate_engine": median(r["timings"]["engine"]["foreign_cores_avg"] for r in ours_gen),
        "peer_ppo": median(r["foreign_cores_avg_measured"] for r in peer_ppo),
        "ours_ppo": median(r["other_processes_cores_avg"] for r in ours_ppo),
    }
    shapes = ours_ppo[0].get("config", {}).get("shapes", "default")
    targets = TARGETS_BY_SHAPES.get(shapes, TARGETS)
    met = {name: ratios[name] >= target for name, target in targets.items() if name in ratios}
    met["peak_rss_vs_trl"] = ratios["peak_rss_vs_trl"] <= 1.0
    environment = ours_gen[0].get("environment", {})
    return {"rounds": len(ours_gen), "shapes": shapes, "targets": targets, "numbers": numbers, "ratios": ratios, "own_cpu_time_ratios": cpu_ratios, "targets_met": met,
            "ours_environment": environment}


def main():
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    summary = summarise(sys.argv[1])
    for name, value in summary["numbers"].items():
        print(f"{name:40s} {value}")
    for name, value in summary["ratios"].items():
        target = summary["targets"].get(name)
        if name not in summary["targets_met"]:
            print(f"{name:40s} {value:6.2f}")
            continue
        note = f"(target {'<=' if name == 'peak_rss_vs_trl' else '>='} {target if target else 1.0}: " \
               f"{'met' if summary['targets_met'][name] else 'NOT met'})"
        print(f"{name:40s} {value:6.2f}  {note}")
    for name, value in summary["own_cpu_time_ratios"].items():
        print(f"{name + ' (own CPU time)':40s} {value:6.2f}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
