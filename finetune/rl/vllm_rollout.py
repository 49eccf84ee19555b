"""Rollouts with vLLM (`<stage>.use_vllm: true`, `pip install 'finetune[vllm]'`, CUDA only).

vLLM samples; transformers still re-scores and trains, so nothing else changes: the log-probs the losses use
are the training model's own (a sampler that differs slightly, as vLLM's kernels do, shows up as a ratio
below 1 in the first pass, not as a wrong loss). Colocated, as TRL's `vllm_mode="colocate"`: vLLM runs in
this process on the same GPU, taking `vllm_gpu_memory_utilization` of its memory. How the weights travel:
the shared base (with the adapters the policy starts from merged in) is written once to a temporary folder
vLLM loads; after every update the policy's LoRA adapter is saved and handed to vLLM as a new LoRA request
(vLLM's multi-LoRA support), so only megabytes move per update. Version skew between vLLM and the trainer
breaks weight hand-over often (trl#3304, trl#2816; OpenRLHF#1349 for colocated LoRA): the extra pins one
vLLM line, and `check_available` refuses anything else with one message.

Which vLLM: the releases built against this project's torch 2.13 are vLLM 0.31 and 0.32 (each pins
torch==2.13.0), and both cap transformers below this project's 5.23 (0.31: <5.18, 0.32: <5.20); vLLM 0.33
pins torch 2.14. So no vLLM release matches both finetune's torch and its transformers today; the extra names
vllm 0.32 and pip reports that conflict. bench/gpu.py runs this path where a GPU and a matching vLLM exist.
"""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path

import torch

from finetune.recipe import Recipe, RecipeError

VLLM_RANGE = (">=0.32.0", "<0.33")  # pyproject.toml's `vllm` extra
NO_MATCH = (
    "no vLLM release matches finetune's torch 2.13 and transformers 5.23: vllm 0.31-0.32 are built for torch "
    "2.13 but need transformers <5.20, vllm 0.33 needs torch 2.14"
)


def check_available(recipe: Recipe, stage: str) -> None:
    """Refuse `use_vllm` before anything loads, in one message, when vLLM or CUDA is missing or vLLM is not
    the pinned line."""
    key = f"{recipe.source}: {stage}.use_vllm"
    if importlib.util.find_spec("vllm") is None:
        raise RecipeError(
            f"{key}: vLLM is not installed. `pip install 'finetune[vllm]'` pins vllm{','.join(VLLM_RANGE)}, but "
            f"{NO_MATCH}, so pip will refuse it until one does. Set {stage}.use_vllm=false to sample with "
            "transformers' generate (the default)."
        )
    if not torch.cuda.is_available():
        raise RecipeError(
            f"{key}: vLLM needs a CUDA GPU and this machine has none; set {stage}.use_vllm=false to sample with "
            "transformers' generate"
        )
    from importlib.metadata import version

    from packaging.specifiers import SpecifierSet

    found = version("vllm")
    if found not in SpecifierSet(",".join(VLLM_RANGE)):
        raise RecipeError(
            f"{key}: vLLM {found} is installed; finetune hands LoRA weights to vllm{','.join(VLLM_RANGE)} only "
            f"(weight hand-over breaks across vLLM versions). Install that range, or set {stage}.use_vllm=false."
        )


class VllmSampler:
    """Samples rollouts with vLLM for an engine (finetune.rl.engine.RolloutEngine uses it in place of
    generate when set as `engine.sampler`); `sync()` hands the policy's current adapter to vLLM."""

    def __init__(self, recipe: Recipe, stage: str, model, tokenizer, engine):
        from vllm import LLM

        check_available(recipe, stage)
        s = recipe.section(stage)
        self.engine, self.model = engine, model
        self._tmp = tempfile.TemporaryDirectory(prefix=f"finetune-{stage}-vllm-")  # removed by close() or at exit
        self.folder = Path(self._tmp.name)
        base = model.peft.get_base_model()
        with model.peft.disable_adapter():
            base.save_pretrained(self.folder / "base", safe_serialization=True)
        tokenizer.save_pretrained(self.folder / "base")
        self.llm = LLM(
            model=str(self.folder / "base"),
            dtype={"fp16": "float16", "bf16": "bfloat16"}.get(recipe.precision, "float32"),
            gpu_memory_utilization=s.vllm_gpu_memory_utilization,
            enable_lora=True,
            max_lora_rank=recipe.lora.r,
            seed=recipe.seed,
            enable_prefix_caching=True,  # the k completions of a prompt share its prefix
        )
        self.version = 0
        self.sync()

    def sync(self) -> None:
        """Save the policy adapter over the last one and make it, under a new LoRA id, the adapter vLLM samples
        with from now on (vLLM caches adapters by id, so a new id makes it read the new weights)."""
        from vllm.lora.request import LoRARequest

        self.version += 1
        target = self.folder / "policy"
        self.model.peft.save_pretrained(str(target), selected_adapters=["policy"])
        nested = target / "policy"  # PEFT nests an adapter not named "default" in a folder of its name
        self.request = LoRARequest(f"policy-{self.version}", self.version, str(nested if nested.is_dir() else target))

    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        """Responses [B, R] for left-padded prompts, as RolloutEngine.generate returns them: sampled at the
        engine's temperature with nothing filtered, a stop token kept, padded to the response length."""
        from vllm import SamplingParams

        e = self.engine
        params = SamplingParams(
            temperature=e.temperature, top_p=1.0, top_k=-1, max_tokens=e.response_length, stop_token_ids=e.stop_ids
        )
        prompts = [{"prompt_token_ids": ids[m.bool()].tolist()} for ids, m in zip(prompt_ids, prompt_mask)]
        outputs = self.llm.generate(prompts, params, lora_request=self.request, use_tqdm=False)
        rows = []
        for out in outputs:
            tokens = list(out.outputs[0].token_ids)
            if out.outputs[0].finish_reason == "stop" and (not tokens or tokens[-1] not in e.stop_ids):
                tokens.append(e.stop_ids[0])  # vLLM may leave the stop token out; the masks need it
            rows.append(tokens[: e.response_length] + [e.pad_id] * (e.response_length - len(tokens)))
        return torch.tensor(rows, dtype=prompt_ids.dtype, device=prompt_ids.device)

    def close(self) -> None:
        self._tmp.cleanup()
