"""One vLLM engine in one process: load a checkpoint at TP 2, generate greedily, write tokens and logprobs as JSON.

Run as a script (vLLM spawns its workers, so engine start-up must sit under ``__main__``)::

    python tests/vllm_plugin/engine.py MODEL_DIR OUT_JSON --load-format tp_loader [--report PATH] [--ep] [--digests]
        [--reload DIR ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

PROMPTS = [[1, 17, 42, 99, 7], [3, 5, 250, 11], [900, 64, 2, 33, 12, 8]]
MAX_TOKENS = 6


def engine_env() -> None:
    """The settings vLLM's CPU build needs on this 2-core machine (one OpenMP thread per rank)."""
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def generate(llm) -> list[dict]:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=0)
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    result = []
    for output in outputs:
        completion = output.outputs[0]
        logprobs = [step[token].logprob for step, token in zip(completion.logprobs, completion.token_ids)]
        result.append({"tokens": list(completion.token_ids), "logprobs": logprobs})
    return result


def parameter_digests(worker) -> dict[str, str]:
    """Runs in each worker (``llm.collective_rpc``): a SHA-256 of every parameter's bytes on that rank, by name."""
    import hashlib

    import torch

    model = worker.model_runner.get_model()
    digests = {}
    for name, param in model.named_parameters():
        data = param.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
        digests[name] = hashlib.sha256(data.numpy().tobytes()).hexdigest()
    return digests


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("--load-format", default="tp_loader")
    parser.add_argument("--report")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--ep", action="store_true", help="expert parallelism (vLLM's enable_expert_parallel)")
    parser.add_argument("--digests", action="store_true", help="each rank's parameter digests instead of generating")
    parser.add_argument("--reload", nargs="*", default=[], help="checkpoints to reload in place, in turn")
    args = parser.parse_args()
    engine_env()
    from vllm import LLM

    extra = {"report": args.report} if args.report else {}
    start = time.perf_counter()
    try:
        llm = LLM(
            model=args.model,
            tensor_parallel_size=args.tp,
            load_format=args.load_format,
            model_loader_extra_config=extra,
            skip_tokenizer_init=True,
            enforce_eager=True,
            dtype=os.environ.get("ENGINE_DTYPE", "float32"),
            max_model_len=64,
            max_num_seqs=4,
            seed=0,
            enable_expert_parallel=args.ep,
        )
    except Exception as exc:  # noqa: BLE001 - the test reads the message
        with open(args.out, "w") as f:
            json.dump({"error": f"{type(exc).__name__}: {exc}"}, f)
        raise SystemExit(3) from None
    started = time.perf_counter() - start
    if args.digests:  # vLLM 0.32's CPU build crashes in the forward with expert parallelism: compare the weights
        out = {"start_seconds": started, "digests": llm.collective_rpc(parameter_digests)}
        with open(args.out, "w") as f:
            json.dump(out, f)
        sys.stdout.flush()
        os._exit(0)
    out = {"start_seconds": started, "runs": [generate(llm)]}
    for path in args.reload:
        llm.collective_rpc("reload_weights", kwargs={"weights_path": path})
        out["runs"].append(generate(llm))
    with open(args.out, "w") as f:
        json.dump(out, f)
    sys.stdout.flush()
    os._exit(0)  # the engine's workers end with the process


if __name__ == "__main__":
    main()
