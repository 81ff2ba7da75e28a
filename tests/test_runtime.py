"""Process set-up before Paddle loads: the CPU floor check and MKL's kernel choice on AMD.

The emulated-CPU tests run an entry point under `qemu-x86_64 -cpu MODEL` (Debian's `qemu-user`),
which reports that model's instruction sets through CPUID: they show what a user of such a CPU
sees. They are skipped where qemu-user is not installed.
"""

import os
import shutil
import subprocess
import sys

import pytest

from ppo import runtime
from ppo.runtime import CpuInfo, UnsupportedCPUError, check_cpu, mkl_environment, parse_cpuinfo

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse sse2 avx avx2 fma

processor\t: 1
vendor_id\t: AuthenticAMD
"""

AVX2 = frozenset({"SSE", "SSE2", "AVX", "AVX2", "FMA3"})


def test_parse_cpuinfo_reads_the_first_processor():
    fields = parse_cpuinfo(CPUINFO)
    assert fields["vendor_id"] == "AuthenticAMD" and fields["model name"] == "AMD EPYC 7B13"


def test_avx2_and_avx512_cpus_pass_the_floor():
    check_cpu(CpuInfo("x86_64", "AuthenticAMD", "AMD EPYC", AVX2))
    check_cpu(CpuInfo("x86_64", "GenuineIntel", "Xeon", AVX2 | {"AVX512F"}))
    check_cpu(CpuInfo("aarch64", "", "", frozenset()))  # other architectures are not judged


@pytest.mark.parametrize("features, missing", [(AVX2 - {"AVX2", "FMA3"}, "AVX2, FMA3"), (frozenset({"SSE2"}), "AVX, AVX2, FMA3")])
def test_cpus_below_the_floor_get_an_error_naming_the_missing_instructions(features, missing):
    with pytest.raises(UnsupportedCPUError, match=f"lacks {missing}: .*needs x86-64 with AVX, AVX2, FMA3"):
        check_cpu(CpuInfo("x86_64", "GenuineIntel", "Old Xeon", features))


def test_mkl_avx2_kernels_on_amd_unless_the_user_chose():
    amd, intel = CpuInfo("x86_64", "AuthenticAMD", "EPYC", AVX2), CpuInfo("x86_64", "GenuineIntel", "Xeon", AVX2)
    assert mkl_environment(amd, {}) == {"MKL_DEBUG_CPU_TYPE": "5"}
    assert mkl_environment(amd, {"MKL_DEBUG_CPU_TYPE": "2"}) == {}  # an explicit value wins
    assert mkl_environment(intel, {}) == {}


def test_prepare_process_sets_the_variable_in_a_fresh_process_on_amd(monkeypatch):
    """Run in a fresh interpreter (Paddle not imported yet), with this CPU described as AMD."""
    code = (
        "import os, ppo.runtime as r\n"
        "r.read_cpu_info = lambda: r.CpuInfo('x86_64', 'AuthenticAMD', 'AMD EPYC', r.cpu_features())\n"
        "print(r.prepare_process()['set'], os.environ.get('MKL_DEBUG_CPU_TYPE'))\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "MKL_DEBUG_CPU_TYPE"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "{'MKL_DEBUG_CPU_TYPE': '5'} 5"
    assert "AMD CPU detected, set MKL_DEBUG_CPU_TYPE=5" in result.stderr
    env["MKL_DEBUG_CPU_TYPE"] = "4"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert result.stdout.strip() == "{} 4"


def test_this_machine_passes_the_floor():
    info = runtime.read_cpu_info()
    check_cpu(info)
    assert info.describe()


QEMU = shutil.which("qemu-x86_64")
needs_qemu = pytest.mark.skipif(QEMU is None, reason="qemu-user (qemu-x86_64) is not installed")


def _emulated(cpu_model, argv, cwd, timeout):
    python = os.path.realpath(sys.executable)  # the interpreter binary, not a shell shim
    # One OpenMP thread: qemu-user can stall on Paddle's thread pool start-up.
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(cwd))
    return subprocess.run(
        [QEMU, "-cpu", cpu_model, python, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


@needs_qemu
@pytest.mark.parametrize("cpu_model, missing", [("Nehalem", "AVX, AVX2, FMA3"), ("SandyBridge", "AVX2, FMA3")])
def test_entry_points_on_a_cpu_below_the_floor_stop_with_a_clear_error(repo_root, cpu_model, missing):
    for script in ("sft/run_sft.py", "rm/run_reward.py", "ppo/run_ppo.py"):
        result = _emulated(cpu_model, [script, "config/tiny/sft_argument.json"], repo_root, timeout=120)
        assert result.returncode == 1, (script, result.returncode, result.stderr[-2000:])
        assert f"lacks {missing}" in result.stderr and "Illegal instruction" in result.stderr  # the message names it
        assert "Traceback" not in result.stderr


@pytest.mark.slow
@needs_qemu
def test_decoder_and_training_step_on_an_emulated_avx2_only_epyc(repo_root, tmp_path):
    """An AMD EPYC (Zen 1: AVX2, FMA, no AVX-512) under emulation: the rollout decoder and an SFT
    training step complete, with the C++ CPU extension (a fused AVX-512 kernel would stop the
    process), and its AVX2 streaming kernels run when asked while the AVX-512 ones are never
    chosen."""
    script = tmp_path / "avx2_run.py"
    script.write_text(
        "import ppo.runtime\n"
        "ppo.runtime.prepare_process()\n"
        "import paddle\n"
        "from ppo.infer_utils import RolloutEngine\n"
        "from ppo.tiny import build_tiny_causal_lm\n"
        "from ppo.models.ppo_model_utils import supervised_lm_loss\n"
        "model = build_tiny_causal_lm('llama', seed=0)\n"
        "ids = paddle.to_tensor([[5, 6, 7, 8]]); mask = paddle.ones_like(ids)\n"
        "out = RolloutEngine(model, eos_token_id=2, pad_token_id=0, backend='decoder').generate(ids, mask, max_new_tokens=3, do_sample=False)\n"
        "loss = supervised_lm_loss(model(input_ids=ids, return_dict=True).logits, ids)\n"
        "loss.backward()\n"
        "from ppo.models import cpu_decode, cpu_extension\n"
        "import os\n"
        "os.environ[cpu_decode.STREAMING_ENV] = 'avx2'  # the AVX2 streaming kernels, on request\n"
        "streamed = RolloutEngine(model, eos_token_id=2, pad_token_id=0, backend='decoder').generate(ids, mask, max_new_tokens=3, do_sample=False)\n"
        "assert streamed.sequences.tolist() == out.sequences.tolist()\n"
        "print('levels', cpu_decode.cpu_vector_level(), cpu_decode.streaming_level())\n"
        "del os.environ[cpu_decode.STREAMING_ENV]\n"
        "print('default', cpu_decode.streaming_level())\n"
        "print('ok', out.sequences.shape, float(loss), 'extension', cpu_extension.load_extension() is not None)\n"
    )
    result = _emulated("EPYC", [str(script)], repo_root, timeout=1500)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1].startswith("ok"), result.stdout
    # The C++ CPU extension (baseline x86-64 code, MKL's own dispatch) ran its decode step and ops.
    from ppo.models import cpu_extension

    if cpu_extension._compiler() is not None:
        assert result.stdout.strip().endswith("extension True"), result.stdout
        # AVX2 without AVX-512: the AVX2 streaming kernels ran on request (same greedy tokens as
        # MKL's), and by default the decode step keeps MKL.
        assert "levels 1 1" in result.stdout and "default 0" in result.stdout, result.stdout
