"""PPO engine: one frozen base with LoRA adapters for the policy, the value function and the reward
model; rollout, scoring and the clipped-PPO update.

Written by hand because no well-kept library has it any more: TRL deleted its PPOTrainer in 2026
(trl#7020) and the toolkits that still offer PPO pin years-old TRL for it. The design, its sources and
where it departs from the usual recipe are in docs/ppo.md; the arithmetic lives in
`finetune.rl.functional` as small pure functions.

Layout: one base model in memory inside one PeftModel, adapters
  policy     trainable LoRA, LM head                      (lora_dropout 0, so step 0 == reference)
  value      trainable LoRA + `value_head` (fp32)          (a copy of the reward model's by default)
  reward     frozen LoRA + `reward_head`                   (the reward stage's adapter and score head)
  reference  adapters disabled, or a frozen `reference` adapter (see `build_model`)
Heads run on the backbone's hidden states, so no vocab-sized logits are computed except for the
response positions of the policy and reference.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass

import torch
from torch import nn

from finetune.core import distributed
from finetune.recipe import PpoAlgorithm

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
    """The shared base + adapters + heads, and the forwards PPO needs."""

    def __init__(
        self, peft_model, value_head: nn.Module, reward_head: nn.Module | None = None, reference_adapter: bool = False
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
        for p in value_head.parameters():
            p.requires_grad_(True)
        if reward_head is not None:
            reward_head.requires_grad_(False)

    # ---- parameters
    def adapter_parameters(self, adapter: str) -> list[nn.Parameter]:
        return [p for _, p in _lora_params(self.peft, adapter)]

    def policy_parameters(self) -> list[nn.Parameter]:
        return self.adapter_parameters(POLICY)

    def value_parameters(self) -> list[nn.Parameter]:
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
    value_init: str = "reward",
    value_config=None,
) -> MultiAdapterModel:
    """One frozen base -> policy / value / reward adapters and heads.

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
    if value_init == VALUE_FROM_REWARD and reward_from:
        peft.add_adapter(VALUE, _adapter_config(reward_from))
        value_head = _score_head(_load_adapter_weights(peft, reward_from, VALUE), reward_from, hidden_size)
    else:
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
        value_head.to(device),
        reward_head.to(device) if reward_head is not None else None,
        reference_adapter=bool(policy_from),
    )
    return model


# ----------------------------------------------------------------------------- the update


@dataclass
class Rollout:
    ids: torch.Tensor  # [B, P+R] prompt (left-padded) + response (padded after the stop token)
    mask: torch.Tensor  # [B, P+R] attention mask = prompt mask + response mask
    prompt_width: int
    responses: torch.Tensor  # [B, R]
    resp_mask: torch.Tensor  # [B, R] 1 up to and including the stop token
    end: torch.Tensor  # [B] index of the stop token (R-1 when none)
    has_stop: torch.Tensor  # [B] bool
    logp: torch.Tensor  # [B, R] policy log-probs at sampling time (re-scored, not from generate)
    ref_logp: torch.Tensor
    values: torch.Tensor
    score: torch.Tensor  # [B] shaped score (normalised, EOS penalty, clip)
    kl: torch.Tensor  # [B, R] per-token KL estimate, masked
    rewards: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    entropy: float


def adapters_in_sync(model: MultiAdapterModel) -> bool:
    """True when every process holds bitwise the same policy and value weights (plain data parallel
    keeps them so: same init, all-reduced gradients, same optimiser steps)."""
    import hashlib

    digest = hashlib.sha256()
    for p in model.policy_parameters() + model.value_parameters():
        digest.update(p.detach().float().cpu().numpy().tobytes())
    return distributed.all_equal(digest.hexdigest())


def _scheduler(kind: str, optimizer, total_updates: int):
    from transformers import get_scheduler

    return get_scheduler(kind, optimizer, num_warmup_steps=0, num_training_steps=total_updates)


class PPOEngine:
    """Rollout -> score -> GAE -> clipped PPO epochs, for one batch of prompts per process.

    `score_fn(rollout_ids, mask, prompt_width, responses, resp_mask, has_stop, rows)` returns the raw
    sequence scores [B] and a dict of figures to log (`rows`: the data rows of the batch's prompts, as
    passed to `step`); the engine shapes them. `settings` is the recipe's `ppo` section (or any
    PpoAlgorithm); `total_updates` sizes the learning-rate schedule.
    With several processes each one rolls out its own prompts and gradients are averaged by
    all-reduce (plain data parallel; see docs/ppo.md for why not ZeRO-2).
    """

    def __init__(
        self,
        model: MultiAdapterModel,
        settings: PpoAlgorithm,
        score_fn,
        stop_ids: list[int],
        pad_id: int,
        seed: int = 0,
        fp16: bool = False,
        total_updates: int = 1,
        switches: SpeedSwitches | None = None,
    ):
        self.model, self.s, self.score_fn = model, settings, score_fn
        self.fast = switches or SpeedSwitches()
        self.stop_ids, self.pad_id = list(stop_ids), pad_id
        self.beta = settings.kl_coef
        self.device = next(model.peft.parameters()).device
        adam = dict(eps=settings.adam_epsilon, weight_decay=settings.weight_decay)
        self.policy_opt = torch.optim.AdamW(model.policy_parameters(), lr=settings.learning_rate, **adam)
        self.value_opt = torch.optim.AdamW(model.value_parameters(), lr=settings.value_learning_rate, **adam)
        self.schedulers = (
            []
            if settings.lr_scheduler_type == "constant"
            else [
                _scheduler(settings.lr_scheduler_type, opt, total_updates) for opt in (self.policy_opt, self.value_opt)
            ]
        )
        self.scaler = torch.amp.GradScaler("cuda") if fp16 else None
        self.shuffle = torch.Generator().manual_seed(seed)
        if settings.gradient_checkpointing:
            model.peft.get_base_model().gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )

    # ---- rollout
    @torch.no_grad()
    def generate(self, prompt_ids, prompt_mask, return_scores: bool = False):
        """Sample responses [B, R] with the policy adapter, KV cache on, in eval mode (no dropout), a
        fresh GenerationConfig (no hidden top_k=50 from the model's defaults)."""
        from transformers import GenerationConfig

        s = self.s
        config = GenerationConfig(
            do_sample=True,
            temperature=s.temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=s.response_length,
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

    @torch.no_grad()
    def held_out(self, prompt_ids, prompt_mask, reward=None, seed: int = 0) -> dict:
        """Figures of the policy on held-out prompts, without training: responses sampled as in a rollout
        (with a fixed seed, so before and after compare like with like, and the training RNG untouched),
        their mean raw reward `reward(ids, mask)` when given, KL to the reference (k1, nats per
        response), EOS rate and length."""
        s, m = self.s, self.model
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            responses = self.generate(prompt_ids, prompt_mask)
        resp_mask, _, has_stop = F.response_mask(responses, self.stop_ids)
        responses = torch.where(resp_mask.bool(), responses, torch.full_like(responses, self.pad_id))
        ids = torch.cat([prompt_ids, responses], dim=1)
        mask = torch.cat([prompt_mask, resp_mask.long()], dim=1)
        P = prompt_ids.shape[1]
        kl = []
        m.peft.eval()
        for i in range(0, len(ids), s.micro_batch_size):
            sl = slice(i, i + s.micro_batch_size)
            with m.active(POLICY):
                logp, _ = m.logprobs(ids[sl], mask[sl], P, s.temperature)
            with m.active(REFERENCE):
                ref, _ = m.logprobs(ids[sl], mask[sl], P, s.temperature)
            kl.append((F.kl_per_token(logp, ref, "k1") * resp_mask[sl]).sum(1))
        return {
            "score": reward(ids, mask).float().mean().item() if reward is not None else None,
            "kl": torch.cat(kl).mean().item(),
            "eos_rate": has_stop.float().mean().item(),
            "response_length": resp_mask.sum(1).float().mean().item(),
        }

    def _pad_response(self, responses: torch.Tensor) -> torch.Tensor:
        """Responses padded to response_length (every sequence of a batch may stop early)."""
        missing = self.s.response_length - responses.shape[1]
        if missing <= 0:
            return responses
        fill = torch.full((len(responses), missing), self.pad_id, dtype=responses.dtype, device=responses.device)
        return torch.cat([responses, fill], dim=1)

    @torch.no_grad()
    def score_rollout(self, prompt_ids, prompt_mask, responses, rows=None) -> tuple[Rollout, dict]:
        """Truncate at the stop token, re-score with one forward per adapter, shape the score, KL,
        rewards and GAE."""
        s, m = self.s, self.model
        resp_mask, end, has_stop = F.response_mask(responses, self.stop_ids)
        responses = torch.where(resp_mask.bool(), responses, torch.full_like(responses, self.pad_id))
        ids = torch.cat([prompt_ids, responses], dim=1)
        mask = torch.cat([prompt_mask, resp_mask.long()], dim=1)
        P = prompt_ids.shape[1]
        m.peft.eval()
        chunks = {k: [] for k in ("logp", "ref", "values", "entropy")}
        for i in range(0, len(ids), s.micro_batch_size):
            sl = slice(i, i + s.micro_batch_size)
            with m.active(POLICY):
                logp, ent = m.logprobs(
                    ids[sl], mask[sl], P, s.temperature, entropy=True, response_only=self.fast.response_only_logits
                )
            with m.active(REFERENCE):
                ref, _ = m.logprobs(ids[sl], mask[sl], P, s.temperature, response_only=self.fast.response_only_logits)
            with m.active(VALUE):
                values = m.values(ids[sl], mask[sl], P)
            for k, v in (("logp", logp), ("ref", ref), ("values", values), ("entropy", ent)):
                chunks[k].append(v)
        logp, ref, values, entropy = (torch.cat(chunks[k]) for k in ("logp", "ref", "values", "entropy"))
        raw, info = self.score_fn(ids, mask, P, responses, resp_mask, has_stop, rows)
        score = F.shape_score(raw.to(logp.device).float(), has_stop, s.missing_eos_penalty, clip=s.score_clip)
        kl = F.kl_per_token(logp, ref, s.kl_estimator) * resp_mask
        rewards = F.token_rewards(score, kl, resp_mask, end, self.beta)
        values = values * resp_mask
        advantages, returns = F.gae(rewards, values, resp_mask, s.gamma, s.lam)
        advantages = F.masked_whiten(advantages, resp_mask, all_reduce=self._all_reduce_sum)
        rollout = Rollout(
            ids,
            mask,
            P,
            responses,
            resp_mask,
            end,
            has_stop,
            logp,
            ref,
            values,
            score,
            kl,
            rewards,
            advantages,
            returns,
            F.masked_mean(entropy, resp_mask).item(),
        )
        stats = {
            "score": info.pop("score", score.mean().item()),
            "score_shaped": score.mean().item(),
            "kl": kl.sum(1).mean().item(),
            "non_score_reward": (-self.beta * kl.sum(1)).mean().item(),
            "eos_rate": has_stop.float().mean().item(),
            "response_length": resp_mask.sum(1).mean().item(),
            "entropy": rollout.entropy,
            "value_mean": F.masked_mean(values, resp_mask).item(),
            **info,
        }
        stats["rlhf_reward"] = stats["score_shaped"] + stats["non_score_reward"]
        return rollout, stats

    @staticmethod
    def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        distributed.all_sum_(t)
        return t

    # ---- optimisation
    def _backward(self, loss):
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def _step(self):
        params = self.model.policy_parameters() + self.model.value_parameters()
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
        for name, opt in (("policy", self.policy_opt), ("value", self.value_opt)):
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
        self.policy_opt.zero_grad(set_to_none=True)
        self.value_opt.zero_grad(set_to_none=True)
        return norms

    def micro_step(self, ro: Rollout, micro: torch.Tensor, weight) -> dict:
        """Policy pass then value pass on rows `micro` of a rollout, each loss scaled by `weight` (this
        micro-batch's share of the minibatch's tokens) and back-propagated inside its adapter's block."""
        s, m = self.s, self.model
        with m.active(POLICY, grad=True):
            logp, _ = m.logprobs(
                ro.ids[micro],
                ro.mask[micro],
                ro.prompt_width,
                s.temperature,
                response_only=self.fast.response_only_logits,
            )
            pg, pg_stats = F.policy_loss(logp, ro.logp[micro], ro.advantages[micro], ro.resp_mask[micro], s.clip_range)
            self._backward(pg * weight)
        with m.active(VALUE, grad=True):
            v = m.values(ro.ids[micro], ro.mask[micro], ro.prompt_width)
            vl, v_stats = F.value_loss(v, ro.values[micro], ro.returns[micro], ro.resp_mask[micro], s.clip_range_value)
            self._backward(vl * s.vf_coef * weight)
        return {"policy_loss": pg.item(), "value_loss": vl.item(), **pg_stats, **v_stats}

    def optimise(self, ro: Rollout) -> dict:
        """K epochs x minibatches; per micro-batch the policy pass (backward) then the value pass
        (backward), never switching adapters between a forward and its backward."""
        s, m = self.s, self.model
        B = len(ro.ids)
        if B % s.mini_batches:
            raise ValueError(f"rollout batch {B} is not divisible into {s.mini_batches} minibatches")
        size = B // s.mini_batches
        m.peft.train()
        logs: dict[str, list[float]] = {}
        for _ in range(s.ppo_epochs):
            order = torch.randperm(B, generator=self.shuffle).to(ro.ids.device)
            for k in range(s.mini_batches):
                idx = order[k * size : (k + 1) * size]
                tokens = ro.resp_mask[idx].sum().clamp(min=1)
                for micro in idx.split(s.micro_batch_size):
                    for key, value in self.micro_step(ro, micro, ro.resp_mask[micro].sum() / tokens).items():
                        logs.setdefault(key, []).append(value)
                for key, value in self._step().items():
                    logs.setdefault(key, []).append(value)
        for sched in self.schedulers:
            sched.step()
        m.peft.eval()
        return {k: sum(v) / len(v) for k, v in logs.items()}

    def step(self, prompt_ids, prompt_mask, rows: list[dict] | None = None) -> dict:
        """One PPO update on this process's prompts (`rows`: their data rows, for the score function);
        returns figures averaged over processes."""
        t0 = time.perf_counter()
        responses = self.generate(prompt_ids, prompt_mask)
        t1 = time.perf_counter()
        rollout, stats = self.score_rollout(prompt_ids, prompt_mask, responses, rows)
        t2 = time.perf_counter()
        stats.update(self.optimise(rollout))
        t3 = time.perf_counter()
        timings = {"time_generate_s": t1 - t0, "time_score_s": t2 - t1, "time_optimise_s": t3 - t2}
        stats.update(timings)
        stats["beta"] = self.beta
        stats = distributed.all_mean(stats, self.device)
        if self.s.adaptive_kl:
            episodes = len(prompt_ids) * distributed.world_size()
            self.beta = F.adaptive_kl_beta(self.beta, stats["kl"], self.s.kl_target, self.s.kl_horizon, episodes)
        self.last_rollout = rollout
        return stats

    # ---- state (checkpoints)
    def state_dict(self) -> dict:
        return {
            "policy_opt": self.policy_opt.state_dict(),
            "value_opt": self.value_opt.state_dict(),
            "schedulers": [s.state_dict() for s in self.schedulers],
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "beta": self.beta,
            "shuffle": self.shuffle.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.policy_opt.load_state_dict(state["policy_opt"])
        self.value_opt.load_state_dict(state["value_opt"])
        for sched, sd in zip(self.schedulers, state["schedulers"]):
            sched.load_state_dict(sd)
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.beta = state["beta"]
        self.shuffle.set_state(state["shuffle"])
