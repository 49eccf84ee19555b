"""Online RL on one frozen base: `functional` (the arithmetic as small pure functions), `engine` (the one-base
model with policy / value / reward adapters, and the rollout PPO and GRPO share), `ppo_engine` and `grpo_engine`
(their updates), `stage` (what the RL stages share around their engines), `scoring` (learned and rule-based
rewards), `checkpoints`, `rewards` (rule rewards that ship), `vllm_rollout` (optional vLLM sampling)."""
