"""What the RL engines share: one frozen base with LoRA adapters (policy, value, reward, reference) and the
forwards on it, rollouts (sampling, truncation at the stop token, re-scoring log-probs), held-out figures and
the data-parallel optimiser step. The updates are in `ppo_engine` (PPO with a value adapter, GAE) and
`grpo_engine` (GRPO and its critic-free relatives); the arithmetic in `functional`, as small pure functions.

Why our own and not a library's. Two well-kept libraries still train PPO with a critic, OpenRLHF and verl,
and TRL's GRPOTrainer trains GRPO; each holds a separate full copy of the model per role (OpenRLHF and verl
on Ray workers; TRL takes a reward model as a second model). What this project needs is one frozen base in
memory with the policy, value and reward as LoRA adapters and heads on it (the reward stage's adapter scores
on the very base the policy runs on), the reference as adapters disabled or a frozen copy of the start
adapter, on today's transformers / PEFT / TRL, inside the project's own recipe, resume and export pipeline.
TRL deleted its PPOTrainer in 2026 (trl#7020). docs/ppo.md and docs/grpo.md give the design, its sources
and the measurements (docs/benchmarks.md) behind that choice.

Layout: one base model in memory inside one PeftModel, adapters
  policy     trainable LoRA, LM head                      (lora_dropout 0, so step 0 == reference)
  value      trainable LoRA + `value_head` (fp32)          (PPO only; a copy of the reward model's by default)
  reward     frozen LoRA + `reward_head`                   (the reward stage's adapter and score head)
  reference  adapters disabled, or a frozen `reference` adapter (see `build_model`)
Heads run on the backbone's hidden states, so no vocab-sized logits are computed except for the
response positions of the policy and reference.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
from torch import nn

from finetune.core import distributed

from . import functional as F

log = logging.getLogger(__name__)

POLICY, VALUE, REWARD, REFERENCE = "policy", "value", "reward", "reference"
VALUE_FROM_REWARD = "reward"  # ppo.value_init: the value adapter and head start as a copy of the reward model's


@dataclass
class SpeedSwitches:
    """Engine speed-ups, on by default. Not recipe keys (switching one off only makes PPO slower);
    bench/ turns them off for its baseline arm (docs/benchmarks.md)."""

    generate_use_cache: bool = True  # KV cache in rollouts (off: every new token re-reads the prefix)
    generation_batch_size: int | None = None  # prompts per generate() call; None = the whole rollout batch
    response_only_logits: bool = True  # LM head on the response positions only (off: every position)


def disable_dropout(model: nn.Module) -> None:
    """Dropout makes the policy differ from the reference at step 0 and the re-scored log-probs differ
    from the sampled ones (docs/ppo.md, "What can go wrong"); PPO trains with every dropout off."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for attr in ("attention_dropout", "attn_pdrop", "resid_pdrop"):
            if isinstance(getattr(module, attr, None), float):
                setattr(module, attr, 0.0)


def _lora_params(peft_model, adapter: str) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in peft_model.named_parameters() if "lora_" in n and f".{adapter}." in n]


class MultiAdapterModel(nn.Module):
    """The shared base + adapters + heads, and the forwards the RL engines need (no value head: GRPO)."""

    def __init__(
        self,
        peft_model,
        value_head: nn.Module | None,
        reward_head: nn.Module | None = None,
        reference_adapter: bool = False,
    ):
        super().__init__()
        self.peft = peft_model
        self.value_head = value_head
        self.reward_head = reward_head
        self.has_reference_adapter = reference_adapter
        hf = peft_model.get_base_model()
        self.backbone = getattr(hf, hf.base_model_prefix)
        self.lm_head = hf.get_output_embeddings()
        for p in peft_model.parameters():  # everything frozen; `activate` opens one adapter
            p.requires_grad_(False)
        for p in value_head.parameters() if value_head is not None else ():
            p.requires_grad_(True)
        if reward_head is not None:
            reward_head.requires_grad_(False)

    # ---- parameters
    def adapter_parameters(self, adapter: str) -> list[nn.Parameter]:
        return [p for _, p in _lora_params(self.peft, adapter)]

    def policy_parameters(self) -> list[nn.Parameter]:
        return self.adapter_parameters(POLICY)

    def value_parameters(self) -> list[nn.Parameter]:
        if self.value_head is None:
            return []
        return self.adapter_parameters(VALUE) + list(self.value_head.parameters())

    # ---- adapter switching
    @contextlib.contextmanager
    def active(self, adapter: str, grad: bool = False):
        """Run with one adapter active (REFERENCE: the reference model). With `grad`, exactly that
        adapter's weights require grad. PEFT's set_adapter also flips requires_grad (peft#2759), and
        switching adapters between a forward and its backward silently drops the gradients (a test in
        tests/rl/test_engine.py shows it), so callers finish backward inside this block."""
        if adapter == REFERENCE and not self.has_reference_adapter:
            with self.peft.disable_adapter():
                yield
            return
        self.peft.set_adapter(adapter)
        for a in (POLICY, VALUE, REWARD, REFERENCE):
            for p in self.adapter_parameters(a):
                p.requires_grad_(grad and a == adapter)
        try:
            yield
        finally:  # outside these blocks the model is the policy (what generate() and users expect)
            self.peft.set_adapter(POLICY)
            for p in (
                self.adapter_parameters(POLICY)
                + self.adapter_parameters(VALUE)
                + self.adapter_parameters(REWARD)
                + self.adapter_parameters(REFERENCE)
            ):
                p.requires_grad_(False)

    # ---- forwards
    def hidden(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Last hidden states with explicit position ids: cumsum(mask) - 1, so a left-padded prompt sees
        the positions it would see alone (models with absolute positions need it)."""
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        return self.backbone(
            input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state

    def logprobs(
        self, ids, mask, prompt_width: int, temperature: float, entropy: bool = False, response_only: bool = True
    ):
        """Log-probs (fp32) of the response tokens ids[:, P:] under the active adapter, at `temperature`
        as sampled (the ratio is taken against those); logits only for the response positions (logits_to_keep), unless
        `response_only` is off (the benchmark's baseline: vocab-sized logits at every position)."""
        if response_only:
            logits = self.lm_head(self.hidden(ids, mask)[:, prompt_width - 1 : -1]).float()
        else:
            logits = self.lm_head(self.hidden(ids, mask)).float()[:, prompt_width - 1 : -1]
        logits = logits / temperature
        logp_all = torch.log_softmax(logits, dim=-1)
        logp = logp_all.gather(-1, ids[:, prompt_width:, None])[..., 0]
        if not entropy:
            return logp, None
        with torch.no_grad():  # a figure to log, never a loss term: no vocabulary-sized tensor kept for backward
            return logp, -(logp_all.exp() * logp_all).sum(-1)

    def values(self, ids, mask, prompt_width: int) -> torch.Tensor:
        """V_t for each response token t: the value head on the state before it (h_{P-1+t})."""
        h = self.hidden(ids, mask)[:, prompt_width - 1 : -1]
        return self.value_head(h.float())[..., 0]

    def reward(self, ids, mask, index: torch.Tensor) -> torch.Tensor:
        h = self.hidden(ids, mask)
        return self.reward_head(h[torch.arange(len(ids), device=ids.device), index].float())[..., 0]


# ----------------------------------------------------------------------------- building


def _adapter_config(folder: str, keep_task: bool = False):
    from peft import PeftConfig

    config = PeftConfig.from_pretrained(folder)
    if not keep_task:
        config.task_type = None  # a sequence-classification adapter's LoRA applies to the causal LM's backbone
    config.modules_to_save = None  # heads are handled here, not by PEFT
    config.lora_dropout = 0.0  # no dropout in PPO (see disable_dropout)
    config.inference_mode = False
    return config


def _load_adapter_weights(peft_model, folder: str, adapter: str) -> dict:
    """Load a saved adapter's LoRA weights into `adapter`; returns the non-LoRA tensors (e.g. the score head)."""
    from peft import load_peft_weights, set_peft_model_state_dict

    weights = load_peft_weights(folder, device="cpu")
    lora = {k: v for k, v in weights.items() if "lora_" in k}
    rest = {k: v for k, v in weights.items() if "lora_" not in k}
    result = set_peft_model_state_dict(peft_model, lora, adapter_name=adapter)
    missing = [k for k in result.missing_keys if f".{adapter}." in k and "lora_" in k]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{folder}: adapter does not fit this base: {len(missing)} missing, "
            f"{len(result.unexpected_keys)} unexpected weights (e.g. {(missing + result.unexpected_keys)[0]})"
        )
    return rest


def _score_head(rest: dict, folder: str, hidden_size: int) -> nn.Linear:
    keys = [k for k in rest if k.endswith("score.weight") or k.endswith("classifier.weight")]
    if len(keys) != 1:
        raise ValueError(
            f"{folder}: no score head in the reward adapter (expected one '*score.weight' tensor, "
            f"found {sorted(rest)}); is this a reward-stage output?"
        )
    weight = rest[keys[0]].float()
    if weight.shape != (1, hidden_size):
        raise ValueError(f"{folder}: score head of shape {tuple(weight.shape)}, expected (1, {hidden_size})")
    head = nn.Linear(hidden_size, 1, bias=True)
    with torch.no_grad():
        head.weight.copy_(weight)
        bias = rest.get(keys[0].replace(".weight", ".bias"))
        head.bias.copy_(bias.float() if bias is not None else torch.zeros(1))
    return head


def build_model(
    base,
    policy_config,
    policy_from: str | None = None,
    reward_from: str | None = None,
    value_init: str | None = "reward",
    value_config=None,
) -> MultiAdapterModel:
    """One frozen base -> policy / value / reward adapters and heads (`value_init` None: no value adapter, as
    GRPO has no critic).

    policy_from None: a new policy LoRA (lora_B = 0) and the reference is the base with adapters
    disabled (docs/ppo.md's layout). policy_from FOLDER (e.g. the DPO adapter, trained on the
    same merged base as the reward model): the policy starts as a trainable copy of it and the
    reference is a frozen copy under the name `reference`. Why a copy: the
    reward adapter only scores correctly on the base it was trained on (the SFT model), so DPO's
    adapter cannot be merged into that base; a second frozen LoRA costs megabytes, not a base copy.
    """
    from peft import PeftModel, get_peft_model

    hidden_size = base.config.hidden_size
    if policy_from:
        peft = PeftModel.from_pretrained(
            base,
            policy_from,
            adapter_name=POLICY,
            is_trainable=True,
            config=_adapter_config(policy_from, keep_task=True),
        )
        peft.add_adapter(REFERENCE, _adapter_config(policy_from))
        _load_adapter_weights(peft, policy_from, REFERENCE)
    else:
        policy_config.lora_dropout = 0.0
        peft = get_peft_model(base, policy_config, adapter_name=POLICY, autocast_adapter_dtype=True)
    reward_head = None
    if reward_from:
        peft.add_adapter(REWARD, _adapter_config(reward_from))
        reward_head = _score_head(_load_adapter_weights(peft, reward_from, REWARD), reward_from, hidden_size)
    value_head = None
    if value_init == VALUE_FROM_REWARD and reward_from:
        peft.add_adapter(VALUE, _adapter_config(reward_from))
        value_head = _score_head(_load_adapter_weights(peft, reward_from, VALUE), reward_from, hidden_size)
    elif value_init is not None:
        config = value_config or policy_config
        config.lora_dropout = 0.0
        peft.add_adapter(VALUE, config)
        value_head = nn.Linear(hidden_size, 1, bias=True)
        nn.init.zeros_(value_head.weight)
        nn.init.zeros_(value_head.bias)
    for name, p in peft.named_parameters():  # adapters fp32 on an fp16/bf16 base (AMP cannot unscale fp16 grads)
        if "lora_" in name and p.dtype != torch.float32:
            p.data = p.data.float()
    disable_dropout(peft)
    peft.set_adapter(POLICY)
    device = next(base.parameters()).device
    model = MultiAdapterModel(
        peft,
        value_head.to(device) if value_head is not None else None,
        reward_head.to(device) if reward_head is not None else None,
        reference_adapter=bool(policy_from),
    )
    return model


# ----------------------------------------------------------------------------- rollouts (shared by PPO and GRPO)


@dataclass
class Sequences:
    """Prompts and their sampled responses, truncated at the stop token."""

    ids: torch.Tensor  # [B, P+R] prompt (left-padded) + response (padded after the stop token)
    mask: torch.Tensor  # [B, P+R] attention mask = prompt mask + response mask
    prompt_width: int
    responses: torch.Tensor  # [B, R]
    resp_mask: torch.Tensor  # [B, R] 1 up to and including the stop token
    end: torch.Tensor  # [B] index of the stop token (R-1 when none)
    has_stop: torch.Tensor  # [B] bool


def adapters_in_sync(model: MultiAdapterModel) -> bool:
    """True when every process holds bitwise the same trained weights (plain data parallel keeps them so:
    same init, all-reduced gradients, same optimiser steps)."""
    import hashlib

    digest = hashlib.sha256()
    for p in model.policy_parameters() + model.value_parameters():
        digest.update(p.detach().float().cpu().numpy().tobytes())
    return distributed.all_equal(digest.hexdigest())


def _param_groups(named: list[tuple[str, nn.Parameter]], lr: float, loraplus_lr_ratio: float | None) -> list[dict]:
    """AdamW parameter groups: one at `lr`, or with LoRA+ (the recipe's lora.loraplus_lr_ratio) the lora_B
    matrices and 1-d parameters at lr x ratio, grouped as PEFT's create_loraplus_optimizer groups them for the
    TRL stages (Hayou et al. 2024). The first group is always at `lr` (what the update log reports)."""
    if loraplus_lr_ratio is None:
        return [{"params": [p for _, p in named], "lr": lr}]
    fast = [p for n, p in named if "lora_B" in n or p.ndim == 1]
    slow = [p for n, p in named if not ("lora_B" in n or p.ndim == 1)]
    return [{"params": slow, "lr": lr}, {"params": fast, "lr": lr * loraplus_lr_ratio}]


def _scheduler(kind: str, optimizer, total_updates: int):
    from transformers import get_scheduler

    return get_scheduler(kind, optimizer, num_warmup_steps=0, num_training_steps=total_updates)


class RolloutEngine:
    """Sampling, truncation, re-scoring and the optimiser step that every RL update here shares.

    `score_fn(ids, mask, prompt_width, responses, resp_mask, has_stop, rows)` gives the raw reward of each
    sequence [B] and a dict of figures; `settings` carries the optimiser keys (adam_epsilon, weight_decay,
    lr_scheduler_type, max_grad_norm, gradient_checkpointing), micro_batch_size and temperature. The subclass
    says what it trains (`trained`: name -> (parameters, learning rate), one optimiser each) and how long a
    response may be (`response_length_of`).
    With several processes each one rolls out its own prompts and gradients are averaged by all-reduce
    (plain data parallel; docs/ppo.md says why not ZeRO-2)."""

    def __init__(
        self,
        model: MultiAdapterModel,
        settings,
        score_fn,
        stop_ids: list[int],
        pad_id: int,
        seed: int = 0,
        fp16: bool = False,
        total_updates: int = 1,
        switches: SpeedSwitches | None = None,
        loraplus_lr_ratio: float | None = None,
    ):
        self.model, self.s, self.score_fn = model, settings, score_fn
        self.response_length, self.temperature = self.response_length_of(settings), settings.temperature
        optimizers = self.trained(model, settings)
        self.micro = settings.micro_batch_size
        self.fast = switches or SpeedSwitches()
        self.stop_ids, self.pad_id = list(stop_ids), pad_id
        self.device = next(model.peft.parameters()).device
        adam = dict(eps=settings.adam_epsilon, weight_decay=settings.weight_decay)
        names = {id(p): n for n, p in model.named_parameters()}  # LoRA+ groups by name (lora_B)
        self.optimizers = {
            name: torch.optim.AdamW(
                _param_groups([(names.get(id(p), ""), p) for p in params], lr, loraplus_lr_ratio), **adam
            )
            for name, (params, lr) in optimizers.items()
        }
        self.schedulers = (
            []
            if settings.lr_scheduler_type == "constant"
            else [_scheduler(settings.lr_scheduler_type, opt, total_updates) for opt in self.optimizers.values()]
        )
        self.scaler = torch.amp.GradScaler("cuda") if fp16 else None
        self.shuffle = torch.Generator().manual_seed(seed)
        self.sampler = None  # a VllmSampler (finetune.rl.vllm_rollout) when <stage>.use_vllm, else generate()
        if settings.gradient_checkpointing:
            model.peft.get_base_model().gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )

    @staticmethod
    def trained(model: MultiAdapterModel, settings) -> dict[str, tuple[list[nn.Parameter], float]]:
        """What the update trains: optimiser name -> (parameters, learning rate). The policy adapter here."""
        return {"policy": (model.policy_parameters(), settings.learning_rate)}

    @staticmethod
    def response_length_of(settings) -> int:
        raise NotImplementedError

    @property
    def policy_opt(self):
        return self.optimizers["policy"]

    # ---- rollout
    @torch.no_grad()
    def generate(self, prompt_ids, prompt_mask, return_scores: bool = False):
        """Sample responses [B, R] with the policy adapter, KV cache on, in eval mode (no dropout), a
        fresh GenerationConfig (no hidden top_k=50 from the model's defaults)."""
        from transformers import GenerationConfig

        if self.sampler is not None and not return_scores:
            return self.sampler.generate(prompt_ids, prompt_mask)
        config = GenerationConfig(
            do_sample=True,
            temperature=self.temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=self.response_length,
            min_new_tokens=0,
            eos_token_id=self.stop_ids,
            pad_token_id=self.pad_id,
            use_cache=self.fast.generate_use_cache,
            # in the config, not as generate() arguments: transformers warns about mixing the two
            output_scores=return_scores,
            return_dict_in_generate=True,
        )
        self.model.peft.eval()
        chunk = self.fast.generation_batch_size or len(prompt_ids)
        responses, scores = [], []
        with self.model.active(POLICY):
            for i in range(0, len(prompt_ids), chunk):
                ids, mask = prompt_ids[i : i + chunk], prompt_mask[i : i + chunk]
                keep = mask.any(0)  # left padding: drop the columns no prompt of this chunk uses
                ids, mask = ids[:, keep], mask[:, keep]
                out = self.model.peft.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    generation_config=config,
                )
                responses.append(self._pad_response(out.sequences[:, ids.shape[1] :]))
                if return_scores:
                    scores.append(torch.stack(out.scores, dim=1))
        responses = torch.cat(responses)
        if return_scores:
            return responses, torch.cat(scores)
        return responses

    def _pad_response(self, responses: torch.Tensor) -> torch.Tensor:
        """Responses padded to response_length (every sequence of a batch may stop early)."""
        missing = self.response_length - responses.shape[1]
        if missing <= 0:
            return responses
        fill = torch.full((len(responses), missing), self.pad_id, dtype=responses.dtype, device=responses.device)
        return torch.cat([responses, fill], dim=1)

    def truncate(self, prompt_ids, prompt_mask, responses) -> Sequences:
        """Cut each response after its first stop token (kept), pad the rest, and join it to its prompt."""
        resp_mask, end, has_stop = F.response_mask(responses, self.stop_ids)
        responses = torch.where(resp_mask.bool(), responses, torch.full_like(responses, self.pad_id))
        ids = torch.cat([prompt_ids, responses], dim=1)
        mask = torch.cat([prompt_mask, resp_mask.long()], dim=1)
        return Sequences(ids, mask, prompt_ids.shape[1], responses, resp_mask, end, has_stop)

    @torch.no_grad()
    def rescore(self, seq: Sequences, adapters: tuple[str, ...], entropy: bool = False) -> dict[str, torch.Tensor]:
        """Log-probs [B, R] of the responses under each adapter (REFERENCE: the reference model), at the
        sampling temperature, one forward per adapter and micro-batch (never from generate's scores,
        trl#454); with `entropy`, the policy's mean entropy per token too (key "entropy")."""
        m = self.model
        m.peft.eval()
        out: dict[str, list] = {a: [] for a in adapters}
        if entropy:
            out["entropy"] = []
        for i in range(0, len(seq.ids), self.micro):
            sl = slice(i, i + self.micro)
            for adapter in adapters:
                with m.active(adapter):
                    logp, ent = m.logprobs(
                        seq.ids[sl],
                        seq.mask[sl],
                        seq.prompt_width,
                        self.temperature,
                        entropy=entropy and adapter == POLICY,
                        response_only=self.fast.response_only_logits,
                    )
                out[adapter].append(logp)
                if ent is not None:
                    out["entropy"].append(ent)
        return {k: torch.cat(v) for k, v in out.items() if v}

    @torch.no_grad()
    def held_out(self, prompt_ids, prompt_mask, reward=None, seed: int = 0) -> dict:
        """Figures of the policy on held-out prompts, without training: responses sampled as in a rollout
        (with a fixed seed, so before and after compare like with like, and the training RNG untouched),
        their mean raw reward `reward(ids, mask)` when given, KL to the reference (k1, nats per
        response), EOS rate and length."""
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            responses = self.generate(prompt_ids, prompt_mask)
        seq = self.truncate(prompt_ids, prompt_mask, responses)
        logps = self.rescore(seq, (POLICY, REFERENCE))
        kl = (F.kl_per_token(logps[POLICY], logps[REFERENCE], "k1") * seq.resp_mask).sum(1)
        return {
            "score": reward(seq.ids, seq.mask).float().mean().item() if reward is not None else None,
            "kl": kl.mean().item(),
            "eos_rate": seq.has_stop.float().mean().item(),
            "response_length": seq.resp_mask.sum(1).float().mean().item(),
        }

    @staticmethod
    def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        distributed.all_sum_(t)
        return t

    # ---- optimisation
    def _backward(self, loss):
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def _step(self) -> dict:
        """All-reduce the gradients (plain data parallel), clip per optimiser, step, zero."""
        params = [p for opt in self.optimizers.values() for g in opt.param_groups for p in g["params"]]
        if distributed.world_size() > 1:  # plain data parallel: average the (small) adapter gradients
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            flat = torch.cat([g.reshape(-1) for g in grads])
            distributed.all_sum_(flat)
            flat /= distributed.world_size()
            offset = 0
            for p in params:
                n = p.numel()
                p.grad = flat[offset : offset + n].view_as(p).clone()
                offset += n
        norms = {}
        for name, opt in self.optimizers.items():
            if self.scaler:
                self.scaler.unscale_(opt)
            group = [p for g in opt.param_groups for p in g["params"]]
            limit = self.s.max_grad_norm if self.s.max_grad_norm is not None else float("inf")
            norms[f"grad_norm_{name}"] = torch.nn.utils.clip_grad_norm_(group, limit).item()
            if self.scaler:
                self.scaler.step(opt)
            else:
                opt.step()
        if self.scaler:
            self.scaler.update()
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        return norms

    def _schedule(self) -> None:
        """After an update's optimiser steps: the learning-rate schedule, and the new weights to vLLM."""
        for sched in self.schedulers:
            sched.step()
        if self.sampler is not None:
            self.sampler.sync()

    # ---- state (checkpoints)
    def state_dict(self) -> dict:
        return {
            "optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()},
            "schedulers": [s.state_dict() for s in self.schedulers],
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "shuffle": self.shuffle.get_state(),
            **self.extra_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        # checkpoints written before GRPO shared this engine name PPO's two optimisers at the top level
        saved = state.get("optimizers") or {"policy": state.get("policy_opt"), "value": state.get("value_opt")}
        for name, opt in self.optimizers.items():
            opt.load_state_dict(saved[name])
        for sched, sd in zip(self.schedulers, state["schedulers"]):
            sched.load_state_dict(sd)
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.shuffle.set_state(state["shuffle"])
        self.load_extra_state(state)

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass
